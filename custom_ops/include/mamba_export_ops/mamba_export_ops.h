// libmamba_export_ops: the ai.mamba_export custom ops (SelectiveScan, CausalConv1d, DecodeStep, RMSNorm, AddRMSNorm,
// LinearF16W, LinearI8W, DecodeBlock, DecodeHead; docs/CONTRACTS.md) for onnxruntime >= 1.21 (C API version 21).
// Register it once per SessionOptions: a second registration fails with "Domain already set in registry".
//
// Usually loaded by onnxruntime itself: SessionOptions::RegisterCustomOpsLibrary (C++),
// register_custom_ops_library (Python). A program may also link the library and call RegisterCustomOps directly.
#pragma once

#include "onnxruntime_c_api.h"

// The only exported symbol (the library is built with hidden visibility).
#define MAMBA_EXPORT_OPS_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

// Adds the ai.mamba_export domain to `options`. Returns an error status (never crashes) when `api` cannot give the
// version-21 API, i.e. onnxruntime is older than 1.21.
MAMBA_EXPORT_OPS_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api);

#ifdef __cplusplus
}
#endif
