// Input validation for the onnxruntime binding: every input's rank, shape (against the others) and dtype.
// A failed check throws InvalidInput, which the binding turns into an INVALID_ARGUMENT status at the API
// boundary (see guard.h); nothing is thrown through onnxruntime.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

namespace mamba_export_ops {

struct InvalidInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A tensor's shape, held inline (no heap allocation per call): the rank and up to kMaxRank dimensions. Every input
// of the ops has rank 3 or less; a deeper input keeps its true rank (so the rank check fails) and its first
// kMaxRank dimensions (for the message).
struct Shape {
  static constexpr size_t kMaxRank = 8;
  size_t rank = 0;
  int64_t dims[kMaxRank] = {};

  size_t size() const { return rank; }
  int64_t operator[](size_t i) const { return dims[i]; }
};

// One input of a kernel call, with what the checks need to describe it.
struct Input {
  const char* op;
  const char* name;
  size_t index;
  ONNXTensorElementDataType dtype;
  Shape shape;
  const void* data;
};

// A named dimension and the value it must have, e.g. {"e", 1536}.
struct Dim {
  const char* name;
  int64_t value;
};

// Reads input `index` (named `name` in messages) through the C API: one onnxruntime call per property, no
// allocation of ours. Throws InvalidInput when it is missing or not a tensor.
Input get_input(const Ort::KernelContext& ctx, const char* op, size_t index, const char* name);

const char* dtype_name(ONNXTensorElementDataType dtype);

// Throws unless `in` has exactly the given dtype; `what` says where the expectation comes from (e.g. "T, as u").
void expect_dtype(const Input& in, ONNXTensorElementDataType dtype, const char* what);

// Throws unless `in` has rank names.size(); returns its shape. `names` only label the message.
const Shape& expect_rank(const Input& in, std::initializer_list<const char*> names);

// Throws unless dimension `axis` of `in` (named `name`) is at least `minimum`.
void expect_at_least(const Input& in, size_t axis, const char* name, int64_t minimum, const char* why);

// Throws unless `in` has exactly the shape `dims` (rank included).
void expect_shape(const Input& in, std::initializer_list<Dim> dims);

// Throws unless `in` has a rank in [lowest, highest]; `layout` describes the expected shape (e.g. "[..., K]").
void expect_rank_between(const Input& in, size_t lowest, size_t highest, const char* layout);

// Throws unless dimension `axis` of `in` equals `dim.value`; `layout` describes the expected shape.
void expect_dim(const Input& in, size_t axis, Dim dim, const char* layout);

}  // namespace mamba_export_ops
