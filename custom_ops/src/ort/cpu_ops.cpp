// onnxruntime binding of the CPU kernels: one op per (name, activation dtype). Each kernel call validates its
// inputs (checks.h), allocates outputs and scratch, and runs the kernel's tasks on the session's intra-op pool.
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "guard.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "op_registry.h"

namespace mamba_export_ops {
namespace {

constexpr ONNXTensorElementDataType F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr const char* kFloat32Why = "parameters and states are float32";

template <typename T>
constexpr ONNXTensorElementDataType onnx_type();
template <>
constexpr ONNXTensorElementDataType onnx_type<float>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
template <>
constexpr ONNXTensorElementDataType onnx_type<half_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }

// Runs task(i) for every i in [0, n) on the session's intra-op thread pool (inline when it has one thread).
template <typename F>
void parallel_for(const Ort::KernelContext& ctx, size_t n, const F& task) {
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<const F*>(data))(i); }, n, 0, const_cast<F*>(&task));
}

// Whether the node sets attribute `name` as a float or a string (where an int is expected).
bool has_float_or_string_attribute(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  float as_float = 0.0f;
  size_t string_size = 0;
  OrtStatus* not_float = api.KernelInfoGetAttribute_float(info, name, &as_float);
  if (not_float == nullptr) return true;
  api.ReleaseStatus(not_float);
  OrtStatus* not_string = api.KernelInfoGetAttribute_string(info, name, nullptr, &string_size);
  if (not_string == nullptr) return true;
  api.ReleaseStatus(not_string);
  return false;
}

// An int attribute that must be 0 or 1; `fallback` when the node does not set it.
bool read_flag(const OrtKernelInfo* info, const char* op, const char* name, bool fallback) {
  const OrtApi& api = Ort::GetApi();
  int64_t value = 0;
  if (OrtStatus* not_int = api.KernelInfoGetAttribute_int64(info, name, &value)) {
    api.ReleaseStatus(not_int);
    if (has_float_or_string_attribute(info, name)) {
      throw InvalidInput(std::string(op) + ": attribute '" + name + "' is not an int, expected an int 0 or 1");
    }
    return fallback;
  }
  if (value != 0 && value != 1) {
    throw InvalidInput(std::string(op) + ": attribute '" + name + "' is " + std::to_string(value) +
                       ", expected 0 or 1");
  }
  return value == 1;
}

// `floats` floats of scratch on a fresh cache line (see kLineFloats), owned by `storage`.
float* line_aligned(std::vector<float>& storage, size_t floats) {
  storage.resize(floats + kLineFloats);
  void* start = storage.data();
  size_t space = storage.size() * sizeof(float);
  return static_cast<float*>(std::align(kLineFloats * sizeof(float), floats * sizeof(float), start, space));
}

template <typename T>
T* output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) {
  return static_cast<T*>(ctx.GetOutput(index, shape).GetTensorMutableRawData());
}

template <typename T>
const T* data(const Input& in) {
  return static_cast<const T*>(in.data);
}

void expect(const Input& in, ONNXTensorElementDataType dtype, const char* why, std::initializer_list<Dim> dims) {
  expect_dtype(in, dtype, why);
  expect_shape(in, dims);
}

// The first activation input defines b, l and e, and T.
template <typename T>
void expect_activation_layout(const Input& x) {
  expect_dtype(x, onnx_type<T>(), "T of this kernel: float32 or float16");
  expect_rank(x, {"b", "l", "e"});
  expect_at_least(x, 0, "b", 1, "an empty batch");
  expect_at_least(x, 1, "l", 1, "an empty sequence");
  expect_at_least(x, 2, "e", 1, "no channels");
}

template <typename T>
struct SelectiveScanKernel {
  static constexpr const char* kName = "SelectiveScan";
  static constexpr bool kInputIsT[] = {true, true, false, true, true, false, true, false, false};
  static constexpr bool kOutputIsT[] = {true, false};

  explicit SelectiveScanKernel(const OrtKernelInfo* info)
      : delta_softplus_(read_flag(info, kName, "delta_softplus", true)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    auto in = [&](size_t i, const char* name) { return get_input(ctx, kName, i, name); };
    const Input u = in(0, "u"), delta = in(1, "delta"), A = in(2, "A"), B = in(3, "B"), C = in(4, "C"),
                D = in(5, "D"), z = in(6, "z"), bias = in(7, "delta_bias"), h0 = in(8, "ssm_state_in");
    expect_activation_layout<T>(u);
    expect_dtype(A, F32, kFloat32Why);
    expect_rank(A, {"e", "n"});
    expect_at_least(A, 1, "n", 1, "an empty state");
    const int64_t b = u.shape[0], l = u.shape[1], e = u.shape[2], n = A.shape[1];
    const ONNXTensorElementDataType t = onnx_type<T>();
    const Dim db{"b", b}, dl{"l", l}, de{"e", e}, dn{"n", n};
    expect(A, F32, kFloat32Why, {de, dn});
    expect(delta, t, "T, as u", {db, dl, de});
    expect(B, t, "T, as u", {db, dl, dn});
    expect(C, t, "T, as u", {db, dl, dn});
    expect(D, F32, kFloat32Why, {de});
    expect(z, t, "T, as u", {db, dl, de});
    expect(bias, F32, kFloat32Why, {de});
    expect(h0, F32, kFloat32Why, {db, de, dn});

    const size_t tasks = selective_scan_num_tasks(b, e);
    std::vector<float> storage;
    float* scratch = line_aligned(storage, tasks * selective_scan_scratch_floats(n));
    const SelectiveScanArgs<T> args{
        data<T>(u), data<T>(delta), data<float>(A), data<T>(B), data<T>(C), data<float>(D), data<T>(z),
        data<float>(bias), data<float>(h0), delta_softplus_, output<T>(ctx, 0, {b, l, e}),
        output<float>(ctx, 1, {b, e, n}), size_t(b), size_t(l), size_t(e), size_t(n), scratch};
    parallel_for(ctx, tasks, [&](size_t i) noexcept { selective_scan_task(args, i); });
  }

  bool delta_softplus_;
};

template <typename T>
struct CausalConv1dKernel {
  static constexpr const char* kName = "CausalConv1d";
  static constexpr bool kInputIsT[] = {true, false, false, false};
  static constexpr bool kOutputIsT[] = {true, false};

  explicit CausalConv1dKernel(const OrtKernelInfo* info) : silu_(read_flag(info, kName, "silu", true)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    auto in = [&](size_t i, const char* name) { return get_input(ctx, kName, i, name); };
    const Input x = in(0, "x"), s0 = in(1, "conv_state_in"), w = in(2, "weight"), bias = in(3, "bias");
    expect_activation_layout<T>(x);
    expect_dtype(w, F32, kFloat32Why);
    expect_rank(w, {"e", "k"});
    expect_at_least(w, 1, "k", 1, "an empty filter");
    const int64_t b = x.shape[0], l = x.shape[1], e = x.shape[2], k = w.shape[1];
    const Dim db{"b", b}, de{"e", e};
    expect(w, F32, kFloat32Why, {de, {"k", k}});
    expect(s0, F32, kFloat32Why, {db, de, {"k-1", k - 1}});
    expect(bias, F32, kFloat32Why, {de});

    const size_t tasks = causal_conv1d_num_tasks(b, e);
    std::vector<float> storage;
    float* scratch = line_aligned(storage, tasks * causal_conv1d_scratch_floats(k));
    const CausalConv1dArgs<T> args{
        data<T>(x), data<float>(s0), data<float>(w), data<float>(bias), silu_, output<T>(ctx, 0, {b, l, e}),
        output<float>(ctx, 1, {b, e, k - 1}), size_t(b), size_t(l), size_t(e), size_t(k), scratch};
    parallel_for(ctx, tasks, [&](size_t i) noexcept { causal_conv1d_task(args, i); });
  }

  bool silu_;
};

template <typename T>
struct DecodeStepKernel {
  static constexpr const char* kName = "DecodeStep";
  static constexpr bool kInputIsT[] = {true, false, false, false, false, false, false, false, false, false};
  static constexpr bool kOutputIsT[] = {true, false, false};

  explicit DecodeStepKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    auto in = [&](size_t i, const char* name) { return get_input(ctx, kName, i, name); };
    const Input xz = in(0, "xz"), cs = in(1, "conv_state_in"), ss = in(2, "ssm_state_in"),
                cw = in(3, "conv_weight"), cbias = in(4, "conv_bias"), xw = in(5, "x_proj_weight"),
                dw = in(6, "dt_proj_weight"), dbias = in(7, "dt_bias"), A = in(8, "A"), D = in(9, "D");
    expect_dtype(xz, onnx_type<T>(), "T of this kernel: float32 or float16");
    expect_rank(xz, {"b", "l", "2e"});
    expect_at_least(xz, 0, "b", 1, "an empty batch");
    expect_at_least(xz, 2, "2e", 2, "no channels");
    const int64_t b = xz.shape[0], e = xz.shape[2] / 2;
    expect_shape(xz, {{"b", b}, {"l", 1}, {"2e", 2 * e}});  // one token; x and z halves of equal width
    expect_dtype(cw, F32, kFloat32Why);
    expect_rank(cw, {"e", "k"});
    expect_at_least(cw, 1, "k", 1, "an empty filter");
    expect_dtype(A, F32, kFloat32Why);
    expect_rank(A, {"e", "n"});
    expect_at_least(A, 1, "n", 1, "an empty state");
    expect_dtype(dw, F32, kFloat32Why);
    expect_rank(dw, {"e", "r"});
    expect_at_least(dw, 1, "r", 1, "an empty dt_rank");
    const int64_t k = cw.shape[1], n = A.shape[1], r = dw.shape[1];
    const Dim db{"b", b}, de{"e", e}, dn{"n", n};
    expect(cw, F32, kFloat32Why, {de, {"k", k}});
    expect(A, F32, kFloat32Why, {de, dn});
    expect(dw, F32, kFloat32Why, {de, {"r", r}});
    expect(cs, F32, kFloat32Why, {db, de, {"k-1", k - 1}});
    expect(ss, F32, kFloat32Why, {db, de, dn});
    expect(cbias, F32, kFloat32Why, {de});
    expect(xw, F32, kFloat32Why, {{"r+2n", r + 2 * n}, de});
    expect(dbias, F32, kFloat32Why, {de});
    expect(D, F32, kFloat32Why, {de});

    std::vector<float> storage;
    const size_t x_conv_floats = round_to_line(b * e);
    float* scratch = line_aligned(storage, x_conv_floats + b * (r + 2 * n));
    const DecodeStepArgs<T> args{
        data<T>(xz), data<float>(cs), data<float>(ss), data<float>(cw), data<float>(cbias), data<float>(xw),
        data<float>(dw), data<float>(dbias), data<float>(A), data<float>(D), output<T>(ctx, 0, {b, 1, e}),
        output<float>(ctx, 1, {b, e, k - 1}), output<float>(ctx, 2, {b, e, n}), size_t(b), size_t(e), size_t(n),
        size_t(k), size_t(r), scratch, scratch + x_conv_floats};
    for (int phase = 1; phase <= 3; ++phase) {
      const size_t tasks = decode_step_num_tasks(phase, b, e, n, r);
      parallel_for(ctx, tasks, [&](size_t i) noexcept { decode_step_task(args, phase, i); });
    }
  }
};

// One registered op: kernel K over activation dtype T.
template <template <typename> class K, typename T>
struct Op : Ort::CustomOpBase<Op<K, T>, K<T>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new K<T>(info); });
  }
  const char* GetName() const { return K<T>::kName; }
  size_t GetInputTypeCount() const { return std::size(K<T>::kInputIsT); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K<T>::kInputIsT[i] ? onnx_type<T>() : F32; }
  size_t GetOutputTypeCount() const { return std::size(K<T>::kOutputIsT); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return K<T>::kOutputIsT[i] ? onnx_type<T>() : F32; }
};

}  // namespace

std::vector<const OrtCustomOp*> cpu_ops() {
  static const Op<SelectiveScanKernel, float> scan_f32;
  static const Op<SelectiveScanKernel, half_t> scan_f16;
  static const Op<CausalConv1dKernel, float> conv_f32;
  static const Op<CausalConv1dKernel, half_t> conv_f16;
  static const Op<DecodeStepKernel, float> decode_f32;
  static const Op<DecodeStepKernel, half_t> decode_f16;
  return {&scan_f32, &scan_f16, &conv_f32, &conv_f16, &decode_f32, &decode_f16};
}

}  // namespace mamba_export_ops
