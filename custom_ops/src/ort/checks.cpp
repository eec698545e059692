#include "checks.h"

#include <sstream>

namespace mamba_export_ops {
namespace {

std::string describe(const Input& in) {
  std::ostringstream s;
  s << in.op << ": input '" << in.name << "' (#" << in.index << ")";
  return s.str();
}

std::string format_shape(const Shape& shape) {
  std::ostringstream s;
  s << "[";
  const size_t shown = shape.rank < Shape::kMaxRank ? shape.rank : Shape::kMaxRank;
  for (size_t i = 0; i < shown; ++i) s << (i ? ", " : "") << shape.dims[i];
  if (shown < shape.rank) s << ", ...";
  s << "]";
  return s.str();
}

}  // namespace

Input get_input(const Ort::KernelContext& ctx, const char* op, size_t index, const char* name) {
  const OrtApi& api = Ort::GetApi();
  const OrtValue* value = nullptr;
  Ort::ThrowOnError(api.KernelContext_GetInput(ctx.GetOrtKernelContext(), index, &value));
  int is_tensor = 0;
  if (value != nullptr) Ort::ThrowOnError(api.IsTensor(value, &is_tensor));
  if (!is_tensor) {
    throw InvalidInput(std::string(op) + ": input '" + name + "' (#" + std::to_string(index) + ") is missing or not a tensor");
  }
  Input in{op, name, index, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}, nullptr};
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Ort::ThrowOnError(api.GetTensorTypeAndShape(value, &info));
  OrtStatus* status = api.GetTensorElementType(info, &in.dtype);
  if (status == nullptr) status = api.GetDimensionsCount(info, &in.shape.rank);
  if (status == nullptr) {
    const size_t stored = in.shape.rank < Shape::kMaxRank ? in.shape.rank : Shape::kMaxRank;
    status = api.GetDimensions(info, in.shape.dims, stored);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  Ort::ThrowOnError(status);
  void* data = nullptr;
  Ort::ThrowOnError(api.GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  in.data = data;
  return in;
}

const char* dtype_name(ONNXTensorElementDataType dtype) {
  switch (dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
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

const Shape& expect_rank(const Input& in, std::initializer_list<const char*> names) {
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

void expect_rank_between(const Input& in, size_t lowest, size_t highest, const char* layout) {
  if (in.shape.size() < lowest || in.shape.size() > highest) {
    throw InvalidInput(describe(in) + " has rank " + std::to_string(in.shape.size()) + " (shape " +
                       format_shape(in.shape) + "), expected rank " + std::to_string(lowest) + " to " +
                       std::to_string(highest) + " " + layout);
  }
}

void expect_dim(const Input& in, size_t axis, Dim dim, const char* layout) {
  if (in.shape[axis] != dim.value) {
    throw InvalidInput(describe(in) + " has shape " + format_shape(in.shape) + ", expected " + layout + " with " +
                       dim.name + "=" + std::to_string(dim.value));
  }
}

}  // namespace mamba_export_ops
