// The custom ops this library registers in the ai.mamba_export domain, one list per execution provider.
#pragma once

#include <vector>

#include "checks.h"

namespace mamba_export_ops {

constexpr const char* kDomain = "ai.mamba_export";

// SelectiveScan, CausalConv1d and DecodeStep for the CPU execution provider, float32 and float16 each.
std::vector<const OrtCustomOp*> cpu_ops();

#ifdef MAMBA_EXPORT_OPS_WITH_CUDA
// The same ops for the CUDA execution provider (custom_ops/cuda/, built when nvcc is found).
std::vector<const OrtCustomOp*> cuda_ops();
#endif

}  // namespace mamba_export_ops
