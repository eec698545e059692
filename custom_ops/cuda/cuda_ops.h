// CUDA kernels of the ai.mamba_export ops for onnxruntime's CUDA execution provider.
//
// cuda_ops() lists SelectiveScan, CausalConv1d and DecodeStep for T = float32, float16 and bfloat16, and RMSNorm and
// AddRMSNorm and DecodeBlock for those T with a float32 or T residual stream; the library's
// registration (custom_ops/src/ort/, built with MAMBA_EXPORT_OPS_WITH_CUDA) adds them to the ai.mamba_export domain
// beside the CPU ops. Each reports GetExecutionProviderType() == "CUDAExecutionProvider", so a CPU-only onnxruntime
// never selects them and the library keeps loading and working there. The CUDA runtime is linked statically: loading
// the library needs no GPU, driver or CUDA toolkit; only running one of these kernels does.
#pragma once

#include <vector>

#include "onnxruntime_c_api.h"

namespace mamba_export_ops {

// The CUDA ops (static objects, valid for the life of the process). Same declaration as src/ort/op_registry.h.
std::vector<const OrtCustomOp*> cuda_ops();

}  // namespace mamba_export_ops
