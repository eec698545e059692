// CUDA kernels of the ai.mamba_export ops for onnxruntime's CUDA execution provider.
//
// AddCudaOps adds SelectiveScan, CausalConv1d and DecodeStep for T = float32, float16 and bfloat16 to a custom-op
// domain. Each op reports GetExecutionProviderType() == "CUDAExecutionProvider", so a CPU-only onnxruntime never
// selects them and the library keeps loading and working there. The CUDA runtime is linked statically: loading the
// library needs no GPU, driver or CUDA toolkit; only running one of these kernels does.
#pragma once

#include "onnxruntime_c_api.h"

namespace mamba_export_cuda {

// Adds the CUDA ops to `domain` (which must outlive every session using it). `api` must be non-null (from
// OrtApiBase::GetApi). Returns nullptr or an error status.
OrtStatus* AddCudaOps(const OrtApi* api, OrtCustomOpDomain* domain);

}  // namespace mamba_export_cuda
