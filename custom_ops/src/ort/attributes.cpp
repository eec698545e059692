#include "attributes.h"

#include <cmath>
#include <cstdint>
#include <sstream>

namespace mamba_export_ops {

bool attribute_is_list(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  size_t size = 0;
  if (OrtStatus* not_floats = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) {
    api.ReleaseStatus(not_floats);
  } else {
    return true;
  }
  if (OrtStatus* not_ints = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api.ReleaseStatus(not_ints);
    return false;
  }
  return true;
}

std::string read_epsilon(const OrtApi& api, const OrtKernelInfo* info, const std::string& op, float* value) {
  float eps = 1e-5f;
  if (OrtStatus* not_float = api.KernelInfoGetAttribute_float(info, "epsilon", &eps)) {
    api.ReleaseStatus(not_float);
    // Absent, or set with another type: an int or a string reads, a missing attribute does not.
    int64_t as_int = 0;
    size_t string_size = 0;
    OrtStatus* not_int = api.KernelInfoGetAttribute_int64(info, "epsilon", &as_int);
    OrtStatus* not_string = not_int ? api.KernelInfoGetAttribute_string(info, "epsilon", nullptr, &string_size) : nullptr;
    const bool other_type =
        not_int == nullptr || not_string == nullptr || attribute_is_list(api, info, "epsilon");
    if (not_int) api.ReleaseStatus(not_int);
    if (not_string) api.ReleaseStatus(not_string);
    if (other_type) return op + ": attribute 'epsilon' is not a float, expected a float >= 0";
    eps = 1e-5f;
  }
  if (!std::isfinite(eps) || eps < 0.0f) {
    std::ostringstream message;
    message << op << ": attribute 'epsilon' is " << eps << ", expected a finite float >= 0";
    return message.str();
  }
  *value = eps;
  return {};
}

}  // namespace mamba_export_ops
