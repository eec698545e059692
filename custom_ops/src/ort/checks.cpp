#include "checks.h"

#include <sstream>

namespace mamba_export_ops {
namespace {

std::string describe(const Input& in) {
  std::ostringstream s;
  s << in.op << ": input '" << in.name << "' (#" << in.index << ")";
  return s.str();
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

}  // namespace

Input get_input(const Ort::KernelContext& ctx, const char* op, size_t index, const char* name) {
  Ort::ConstValue value = ctx.GetInput(index);
  if (!value || !value.IsTensor()) {
    throw InvalidInput(std::string(op) + ": input '" + name + "' (#" + std::to_string(index) + ") is missing or not a tensor");
  }
  auto info = value.GetTensorTypeAndShapeInfo();
  return Input{op, name, index, info.GetElementType(), info.GetShape(), value.GetTensorRawData()};
}

const char* dtype_name(ONNXTensorElementDataType dtype) {
  switch (dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another dtype";
  }
}

void expect_dtype(const Input& in, ONNXTensorElementDataType dtype, const char* what) {
  if (in.dtype != dtype) {
    throw InvalidInput(describe(in) + " has dtype " + dtype_name(in.dtype) + ", expected " + dtype_name(dtype) +
                       " (" + what + ")");
  }
}

const std::vector<int64_t>& expect_rank(const Input& in, std::initializer_list<const char*> names) {
  if (in.shape.size() != names.size()) {
    std::ostringstream s;
    s << describe(in) << " has rank " << in.shape.size() << " (shape " << format_shape(in.shape)
      << "), expected rank " << names.size() << " [";
    size_t i = 0;
    for (const char* n : names) s << (i++ ? ", " : "") << n;
    s << "]";
    throw InvalidInput(s.str());
  }
  return in.shape;
}

void expect_at_least(const Input& in, size_t axis, const char* name, int64_t minimum, const char* why) {
  if (in.shape[axis] < minimum) {
    throw InvalidInput(describe(in) + " has " + name + " = " + std::to_string(in.shape[axis]) + " (shape " +
                       format_shape(in.shape) + "), expected " + name + " >= " + std::to_string(minimum) + " (" +
                       why + ")");
  }
}

void expect_shape(const Input& in, std::initializer_list<Dim> dims) {
  bool same = in.shape.size() == dims.size();
  size_t i = 0;
  for (const Dim& d : dims) {
    same = same && in.shape[i++] == d.value;
  }
  if (!same) {
    std::ostringstream s;
    s << describe(in) << " has shape " << format_shape(in.shape) << ", expected [";
    i = 0;
    for (const Dim& d : dims) s << (i++ ? ", " : "") << d.name << "=" << d.value;
    s << "]";
    throw InvalidInput(s.str());
  }
}

}  // namespace mamba_export_ops
