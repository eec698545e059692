// Node attributes shared by the CPU and CUDA bindings. C API only, so that both bindings can use it.
#pragma once

#include <string>

#include "onnxruntime_c_api.h"

namespace mamba_export_ops {

// Whether the node sets attribute `name` as a list of floats or of ints (the scalar getters fail on those as they fail
// on a missing attribute, so without this check a list would silently read as "not set").
bool attribute_is_list(const OrtApi& api, const OrtKernelInfo* info, const char* name);

// The `epsilon` attribute of RMSNorm/AddRMSNorm: a finite float >= 0, 1e-5 when the node does not set it. Sets
// *value and returns an empty string, or returns the error message ("<op>: attribute 'epsilon' is ...").
std::string read_epsilon(const OrtApi& api, const OrtKernelInfo* info, const std::string& op, float* value);

}  // namespace mamba_export_ops
