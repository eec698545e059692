// onnxruntime binding of the CPU kernels: one op per (name, activation dtype[, residual dtype]). Each kernel call
// validates its inputs (checks.h), allocates outputs and scratch, and runs the kernel's tasks on the session's
// intra-op pool. The per-call path allocates nothing of its own on the heap in the common case: input shapes are held
// inline (checks.h), output shapes are passed as arrays, and scratch up to kStackScratchFloats lives on the stack.
#include <iterator>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attributes.h"
#include "guard.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "op_registry.h"

namespace mamba_export_ops {
namespace {

constexpr ONNXTensorElementDataType F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType I8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr const char* kFloat32Why = "parameters and states are float32";
constexpr const char* kWhyT = "T of this kernel: float32 or float16";
constexpr const char* kWhyR = "R of this kernel (the residual stream): float32, or T";

template <typename T>
constexpr ONNXTensorElementDataType onnx_type();
template <>
constexpr ONNXTensorElementDataType onnx_type<float>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
template <>
constexpr ONNXTensorElementDataType onnx_type<half_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }

// The type of an op's input or output: T (the activations), R (the residual stream), float32, float16 or int8.
enum class Kind { T, R, F32, F16, I8 };

// Runs task(i) for every i in [0, n) on the session's intra-op thread pool (inline when it has one thread, or when
// there is one task: no hand-off at all then).
template <typename F>
void parallel_for(const Ort::KernelContext& ctx, size_t n, const F& task) {
  if (n == 0) return;
  if (n == 1) {
    task(0);
    return;
  }
  ctx.ParallelFor([](void* data, size_t i) { (*static_cast<const F*>(data))(i); }, n, 0, const_cast<F*>(&task));
}

// Whether the node sets attribute `name` as a float, a string or a list (where an int is expected).
bool has_non_int_attribute(const OrtKernelInfo* info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  float as_float = 0.0f;
  size_t string_size = 0;
  OrtStatus* not_float = api.KernelInfoGetAttribute_float(info, name, &as_float);
  if (not_float == nullptr) return true;
  api.ReleaseStatus(not_float);
  OrtStatus* not_string = api.KernelInfoGetAttribute_string(info, name, nullptr, &string_size);
  if (not_string == nullptr) return true;
  api.ReleaseStatus(not_string);
  return attribute_is_list(api, info, name);
}

// An int attribute that must be 0 or 1; `fallback` when the node does not set it.
bool read_flag(const OrtKernelInfo* info, const char* op, const char* name, bool fallback) {
  const OrtApi& api = Ort::GetApi();
  int64_t value = 0;
  if (OrtStatus* not_int = api.KernelInfoGetAttribute_int64(info, name, &value)) {
    api.ReleaseStatus(not_int);
    if (has_non_int_attribute(info, name)) {
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

// Epsilon of RMSNorm/AddRMSNorm (attributes.h); a bad one throws InvalidInput.
float epsilon_of(const OrtKernelInfo* info, const char* op) {
  float value = 1e-5f;
  const std::string error = read_epsilon(Ort::GetApi(), info, op, &value);
  if (!error.empty()) throw InvalidInput(error);
  return value;
}

// Scratch of a kernel call, on a fresh cache line (see kLineFloats): on the stack up to kStackScratchFloats (a
// decode step of a model up to d_inner ~3500 at batch 1, or the scan of a few channel blocks), else on the heap. The
// pool's threads use it only inside the call's ParallelFor, while the caller's frame is alive.
constexpr size_t kStackScratchFloats = 4096;

class Scratch {
 public:
  explicit Scratch(size_t floats) {
    if (floats + kLineFloats <= kStackScratchFloats) {
      data_ = aligned(stack_, kStackScratchFloats, floats);
    } else {
      heap_.reset(new float[floats + kLineFloats]);
      data_ = aligned(heap_.get(), floats + kLineFloats, floats);
    }
  }
  float* get() const { return data_; }

 private:
  static float* aligned(float* start, size_t capacity, size_t floats) {
    void* p = start;
    size_t space = capacity * sizeof(float);
    return static_cast<float*>(std::align(kLineFloats * sizeof(float), floats * sizeof(float), p, space));
  }

  float stack_[kStackScratchFloats];
  std::unique_ptr<float[]> heap_;
  float* data_ = nullptr;
};

template <typename T, size_t N>
T* output(Ort::KernelContext& ctx, size_t index, const int64_t (&shape)[N]) {
  return static_cast<T*>(ctx.GetOutput(index, shape, N).GetTensorMutableRawData());
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
  static constexpr Kind kInputs[] = {Kind::T, Kind::T, Kind::F32, Kind::T, Kind::T, Kind::F32, Kind::T, Kind::F32,
                                     Kind::F32};
  static constexpr Kind kOutputs[] = {Kind::T, Kind::F32};

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
    const Scratch scratch(tasks * selective_scan_scratch_floats(n));
    const SelectiveScanArgs<T> args{
        data<T>(u), data<T>(delta), data<float>(A), data<T>(B), data<T>(C), data<float>(D), data<T>(z),
        data<float>(bias), data<float>(h0), delta_softplus_, output<T>(ctx, 0, {b, l, e}),
        output<float>(ctx, 1, {b, e, n}), size_t(b), size_t(l), size_t(e), size_t(n), scratch.get()};
    parallel_for(ctx, tasks, [&](size_t i) noexcept { selective_scan_task(args, i); });
  }

  bool delta_softplus_;
};

template <typename T>
struct CausalConv1dKernel {
  static constexpr const char* kName = "CausalConv1d";
  static constexpr Kind kInputs[] = {Kind::T, Kind::F32, Kind::F32, Kind::F32};
  static constexpr Kind kOutputs[] = {Kind::T, Kind::F32};

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
    const Scratch scratch(tasks * causal_conv1d_scratch_floats(k));
    const CausalConv1dArgs<T> args{
        data<T>(x), data<float>(s0), data<float>(w), data<float>(bias), silu_, output<T>(ctx, 0, {b, l, e}),
        output<float>(ctx, 1, {b, e, k - 1}), size_t(b), size_t(l), size_t(e), size_t(k), scratch.get()};
    parallel_for(ctx, tasks, [&](size_t i) noexcept { causal_conv1d_task(args, i); });
  }

  bool silu_;
};

// DecodeStep's states and parameters, its inputs 1 to 9 (DecodeBlock's 4 to 12), in that order.
struct StepInputs {
  Input cs, ss, cw, cbias, xw, dw, dbias, A, D;
};

StepInputs step_inputs(const Ort::KernelContext& ctx, const char* op, size_t first) {
  auto in = [&](size_t i, const char* name) { return get_input(ctx, op, first + i, name); };
  return {in(0, "conv_state_in"), in(1, "ssm_state_in"), in(2, "conv_weight"), in(3, "conv_bias"),
          in(4, "x_proj_weight"), in(5, "dt_proj_weight"), in(6, "dt_bias"), in(7, "A"), in(8, "D")};
}

struct StepSizes {
  int64_t k, n, r;
};

// Checks DecodeStep's states and parameters for b rows of e channels; returns d_conv, d_state and dt_rank.
StepSizes expect_step_inputs(const StepInputs& p, int64_t b, int64_t e) {
  expect_dtype(p.cw, F32, kFloat32Why);
  expect_rank(p.cw, {"e", "k"});
  expect_at_least(p.cw, 1, "k", 1, "an empty filter");
  expect_dtype(p.A, F32, kFloat32Why);
  expect_rank(p.A, {"e", "n"});
  expect_at_least(p.A, 1, "n", 1, "an empty state");
  expect_dtype(p.dw, F32, kFloat32Why);
  expect_rank(p.dw, {"e", "r"});
  expect_at_least(p.dw, 1, "r", 1, "an empty dt_rank");
  const int64_t k = p.cw.shape[1], n = p.A.shape[1], r = p.dw.shape[1];
  const Dim db{"b", b}, de{"e", e}, dn{"n", n};
  expect(p.cw, F32, kFloat32Why, {de, {"k", k}});
  expect(p.A, F32, kFloat32Why, {de, dn});
  expect(p.dw, F32, kFloat32Why, {de, {"r", r}});
  expect(p.cs, F32, kFloat32Why, {db, de, {"k-1", k - 1}});
  expect(p.ss, F32, kFloat32Why, {db, de, dn});
  expect(p.cbias, F32, kFloat32Why, {de});
  expect(p.xw, F32, kFloat32Why, {{"r+2n", r + 2 * n}, de});
  expect(p.dbias, F32, kFloat32Why, {de});
  expect(p.D, F32, kFloat32Why, {de});
  return {k, n, r};
}

template <typename T>
struct DecodeStepKernel {
  static constexpr const char* kName = "DecodeStep";
  static constexpr Kind kInputs[] = {Kind::T,   Kind::F32, Kind::F32, Kind::F32, Kind::F32,
                                     Kind::F32, Kind::F32, Kind::F32, Kind::F32, Kind::F32};
  static constexpr Kind kOutputs[] = {Kind::T, Kind::F32, Kind::F32};

  explicit DecodeStepKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    const Input xz = get_input(ctx, kName, 0, "xz");
    expect_dtype(xz, onnx_type<T>(), "T of this kernel: float32 or float16");
    expect_rank(xz, {"b", "l", "2e"});
    expect_at_least(xz, 0, "b", 1, "an empty batch");
    expect_at_least(xz, 2, "2e", 2, "no channels");
    const int64_t b = xz.shape[0], e = xz.shape[2] / 2;
    expect_shape(xz, {{"b", b}, {"l", 1}, {"2e (even)", 2 * e}});  // one token; x and z halves of equal width
    const StepInputs p = step_inputs(ctx, kName, 1);
    const auto [k, n, r] = expect_step_inputs(p, b, e);

    const size_t x_conv_floats = round_to_line(b * e);
    const Scratch storage(x_conv_floats + b * (r + 2 * n));
    float* scratch = storage.get();
    const DecodeStepArgs<T> args{
        data<T>(xz), data<float>(p.cs), data<float>(p.ss), data<float>(p.cw), data<float>(p.cbias),
        data<float>(p.xw), data<float>(p.dw), data<float>(p.dbias), data<float>(p.A), data<float>(p.D),
        output<T>(ctx, 0, {b, 1, e}), output<float>(ctx, 1, {b, e, k - 1}), output<float>(ctx, 2, {b, e, n}),
        size_t(b), size_t(e), size_t(n), size_t(k), size_t(r), scratch, scratch + x_conv_floats};
    for (int phase = 1; phase <= 3; ++phase) {
      const size_t tasks = decode_step_num_tasks(phase, b, e, n, r);
      parallel_for(ctx, tasks, [&](size_t i) noexcept { decode_step_task(args, phase, i); });
    }
  }
};

// RMSNorm (kAdd false) and AddRMSNorm (kAdd true) over activation dtype T and residual dtype R.
template <typename R, typename T, bool kAdd>
struct NormKernel {
  static constexpr const char* kName = kAdd ? "AddRMSNorm" : "RMSNorm";
  static constexpr const char* kWhyT = "T of this kernel (the weight's type): float32 or float16";
  static constexpr const char* kWhyR = "R of this kernel (the residual stream): float32, or T";

  explicit NormKernel(const OrtKernelInfo* info) : epsilon_(epsilon_of(info, kName)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    // RMSNorm: x (R), weight (T). AddRMSNorm: x (T), residual (R), weight (T). The normalised input has type R.
    const Input first = get_input(ctx, kName, 0, "x");
    const Input residual = kAdd ? get_input(ctx, kName, 1, "residual") : first;
    const Input weight = get_input(ctx, kName, kAdd ? 2 : 1, "weight");
    expect_dtype(first, kAdd ? onnx_type<T>() : onnx_type<R>(), kAdd ? kWhyT : kWhyR);
    expect_rank(first, {"b", "l", "d"});
    expect_at_least(first, 0, "b", 1, "an empty batch");
    expect_at_least(first, 1, "l", 1, "an empty sequence");
    expect_at_least(first, 2, "d", 1, "an empty row");
    const int64_t b = first.shape[0], l = first.shape[1], d = first.shape[2];
    const Dim dd{"d", d};
    if (kAdd) expect(residual, onnx_type<R>(), kWhyR, {{"b", b}, {"l", l}, dd});
    expect(weight, onnx_type<T>(), kWhyT, {dd});

    const RmsNormArgs<R, T> args{kAdd ? data<T>(first) : nullptr, data<R>(residual), data<T>(weight), epsilon_,
                                 output<T>(ctx, 0, {b, l, d}), kAdd ? output<R>(ctx, 1, {b, l, d}) : nullptr,
                                 size_t(b * l), size_t(d)};
    const size_t tasks = rms_norm_num_tasks(args.rows, args.d);  // 1 for a decode step's rows: run inline
    parallel_for(ctx, tasks, [&](size_t i) noexcept { rms_norm_task(args, i, tasks); });
  }

  float epsilon_;
};

template <typename R, typename T>
struct RmsNormKernel : NormKernel<R, T, false> {
  static constexpr Kind kInputs[] = {Kind::R, Kind::T};
  static constexpr Kind kOutputs[] = {Kind::T};
  using NormKernel<R, T, false>::NormKernel;
};

template <typename R, typename T>
struct AddRmsNormKernel : NormKernel<R, T, true> {
  static constexpr Kind kInputs[] = {Kind::T, Kind::R, Kind::T};
  static constexpr Kind kOutputs[] = {Kind::T, Kind::R};
  using NormKernel<R, T, true>::NormKernel;
};

// The fused decode ops' input x [b, 1, d] in T (one token per sequence): checks it, returns b and d.
struct TokenRows {
  int64_t b, d;
};

template <typename T>
TokenRows expect_token_rows(const Input& x) {
  expect_dtype(x, onnx_type<T>(), kWhyT);
  expect_rank(x, {"b", "l", "d"});
  expect_at_least(x, 0, "b", 1, "an empty batch");
  expect_at_least(x, 2, "d", 1, "an empty row");
  const int64_t b = x.shape[0], d = x.shape[2];
  expect_shape(x, {{"b", b}, {"l", 1}, {"d", d}});  // one token
  return {b, d};
}

// DecodeBlock: a whole decode layer (AddRMSNorm, in_proj, DecodeStep, out_proj) over T and residual type R.
template <typename R, typename T>
struct DecodeBlockKernel {
  static constexpr const char* kName = "DecodeBlock";
  static constexpr Kind kInputs[] = {Kind::T,   Kind::R,   Kind::T,   Kind::T,   Kind::F32, Kind::F32, Kind::F32,
                                     Kind::F32, Kind::F32, Kind::F32, Kind::F32, Kind::F32, Kind::F32, Kind::T};
  static constexpr Kind kOutputs[] = {Kind::T, Kind::R, Kind::F32, Kind::F32};

  explicit DecodeBlockKernel(const OrtKernelInfo* info) : epsilon_(epsilon_of(info, kName)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    auto in = [&](size_t i, const char* name) { return get_input(ctx, kName, i, name); };
    const Input x = in(0, "x"), residual = in(1, "residual"), norm_w = in(2, "norm_weight"),
                in_w = in(3, "in_proj_weight"), out_w = in(13, "out_proj_weight");
    const auto [b, d] = expect_token_rows<T>(x);
    const Dim dd{"d", d};
    // One residual row per sequence, or one row for all (the exporter's zero residual of layer 0).
    const bool shared_residual = residual.shape.size() == 3 && residual.shape[0] == 1;
    expect(residual, onnx_type<R>(), kWhyR, {{b == 1 ? "b" : "b (or 1)", shared_residual ? 1 : b}, {"l", 1}, dd});
    expect(norm_w, onnx_type<T>(), kWhyT, {dd});
    expect_dtype(in_w, onnx_type<T>(), kWhyT);
    expect_rank(in_w, {"2e", "d"});
    expect_at_least(in_w, 0, "2e", 2, "no channels");
    const int64_t e = in_w.shape[0] / 2;
    expect_shape(in_w, {{"2e (even)", 2 * e}, dd});  // x and z halves of equal width
    expect(out_w, onnx_type<T>(), kWhyT, {dd, {"e", e}});
    const StepInputs p = step_inputs(ctx, kName, 4);
    const auto [k, n, r] = expect_step_inputs(p, b, e);

    const Scratch scratch(decode_block_scratch_floats(b, d, e, n, r));
    const DecodeBlockArgs<R, T> args{
        data<T>(x), data<R>(residual), data<T>(norm_w), data<T>(in_w), data<float>(p.cs), data<float>(p.ss),
        data<float>(p.cw), data<float>(p.cbias), data<float>(p.xw), data<float>(p.dw), data<float>(p.dbias),
        data<float>(p.A), data<float>(p.D), data<T>(out_w), epsilon_, output<T>(ctx, 0, {b, 1, d}),
        output<R>(ctx, 1, {b, 1, d}), output<float>(ctx, 2, {b, e, k - 1}), output<float>(ctx, 3, {b, e, n}),
        size_t(b), size_t(d), size_t(e), size_t(n), size_t(k), size_t(r), scratch.get(), shared_residual};
    for (int phase = 0; phase < kDecodeBlockPhases; ++phase) {
      parallel_for(ctx, decode_block_num_tasks(args, phase), [&](size_t i) noexcept {
        decode_block_task(args, phase, i);
      });
    }
  }

  float epsilon_;
};

// DecodeHead: the final AddRMSNorm and the LM head of a decode step over T and residual type R.
template <typename R, typename T>
struct DecodeHeadKernel {
  static constexpr const char* kName = "DecodeHead";
  static constexpr Kind kInputs[] = {Kind::T, Kind::R, Kind::T, Kind::T};
  static constexpr Kind kOutputs[] = {Kind::T};

  explicit DecodeHeadKernel(const OrtKernelInfo* info) : epsilon_(epsilon_of(info, kName)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    auto in = [&](size_t i, const char* name) { return get_input(ctx, kName, i, name); };
    const Input x = in(0, "x"), residual = in(1, "residual"), norm_w = in(2, "norm_weight"), w = in(3, "weight");
    const auto [b, d] = expect_token_rows<T>(x);
    const Dim dd{"d", d};
    expect(residual, onnx_type<R>(), kWhyR, {{"b", b}, {"l", 1}, dd});
    expect(norm_w, onnx_type<T>(), kWhyT, {dd});
    expect_dtype(w, onnx_type<T>(), kWhyT);
    expect_rank(w, {"V", "d"});
    expect_at_least(w, 0, "V", 1, "an empty vocabulary");
    const int64_t v = w.shape[0];
    expect_shape(w, {{"V", v}, dd});

    const Scratch scratch(decode_head_scratch_floats<T>(b, d, v));
    const DecodeHeadArgs<R, T> args{data<T>(x), data<R>(residual), data<T>(norm_w), data<T>(w), epsilon_,
                                    output<T>(ctx, 0, {b, 1, v}), size_t(b), size_t(d), size_t(v), scratch.get()};
    for (int phase = 0; phase < kDecodeHeadPhases; ++phase) {
      parallel_for(ctx, decode_head_num_tasks(args, phase), [&](size_t i) noexcept {
        decode_head_task(args, phase, i);
      });
    }
  }

  float epsilon_;
};

// The linear ops with narrow weights, the layer y = x W^T of cpu_kernels.h (float32 sums):
// LinearF16W: X float32 [..., K], W float16 [N, K] -> Y float32 [..., N] = X W^T;
// LinearI8W: X float32 [..., K], W int8 [N, K], S float32 [N] -> Y float32 [..., N] = (X W^T) * S (each output times
// the scale of its row of W).
template <typename W>
struct NarrowWeights;
template <>
struct NarrowWeights<half_t> {
  static constexpr const char* kName = "LinearF16W";
  static constexpr Kind kInputs[] = {Kind::F32, Kind::F16};
};
template <>
struct NarrowWeights<int8_t> {
  static constexpr const char* kName = "LinearI8W";
  static constexpr Kind kInputs[] = {Kind::F32, Kind::I8, Kind::F32};
};

template <typename W>
struct LinearNarrowKernel : NarrowWeights<W> {
  using NarrowWeights<W>::kName;
  static constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  static constexpr Kind kOutputs[] = {Kind::F32};
  static constexpr const char* kLayoutX = "[..., K]";

  explicit LinearNarrowKernel(const OrtKernelInfo*) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  void compute(Ort::KernelContext ctx) const {
    const Input x = get_input(ctx, kName, 0, "X"), w = get_input(ctx, kName, 1, "W");
    expect_dtype(x, F32, "the activations: float32");
    if constexpr (kInt8) {
      expect_dtype(w, I8, "the weights: int8");
    } else {
      expect_dtype(w, F16, "the weights: float16");
    }
    expect_rank(w, {"N", "K"});
    expect_at_least(w, 0, "N", 1, "no outputs");
    expect_at_least(w, 1, "K", 1, "empty rows");
    const int64_t n = w.shape[0], k = w.shape[1];
    const float* scale = nullptr;
    if constexpr (kInt8) {
      const Input s = get_input(ctx, kName, 2, "S");
      expect(s, F32, "the scales: float32", {{"N", n}});
      scale = data<float>(s);
    }
    expect_rank_between(x, 1, Shape::kMaxRank, kLayoutX);
    const size_t rank = x.shape.size();
    expect_dim(x, rank - 1, {"K", k}, kLayoutX);
    int64_t y_shape[Shape::kMaxRank];
    size_t m = 1;
    for (size_t i = 0; i + 1 < rank; ++i) {
      expect_at_least(x, i, "a leading dimension", 1, "an empty input");
      y_shape[i] = x.shape[i];
      m *= size_t(x.shape[i]);
    }
    y_shape[rank - 1] = n;
    float* y = static_cast<float*>(ctx.GetOutput(0, y_shape, rank).GetTensorMutableRawData());
    const LinearArgs<W> args{data<float>(x), data<W>(w), y, m, size_t(n), size_t(k), nullptr, scale};
    parallel_for(ctx, linear_num_tasks<W>(args.n, args.k), [&](size_t i) noexcept { linear_task(args, i); });
  }
};

template <typename R, typename T>
constexpr ONNXTensorElementDataType type_of(Kind kind) {
  return kind == Kind::T     ? onnx_type<T>()
         : kind == Kind::R   ? onnx_type<R>()
         : kind == Kind::F16 ? F16
         : kind == Kind::I8  ? I8
                             : F32;
}

// One registered op: kernel K over activation dtype T and residual dtype R.
template <typename K, typename R, typename T>
struct Op : Ort::CustomOpBase<Op<K, R, T>, K, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new K(info); });
  }
  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return std::size(K::kInputs); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return type_of<R, T>(K::kInputs[i]); }
  size_t GetOutputTypeCount() const { return std::size(K::kOutputs); }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return type_of<R, T>(K::kOutputs[i]); }
};

template <template <typename> class K, typename T>
using OpT = Op<K<T>, float, T>;  // ops over T alone (R unused)
template <template <typename, typename> class K, typename R, typename T>
using OpRT = Op<K<R, T>, R, T>;

}  // namespace

std::vector<const OrtCustomOp*> cpu_ops() {
  static const OpT<SelectiveScanKernel, float> scan_f32;
  static const OpT<SelectiveScanKernel, half_t> scan_f16;
  static const OpT<CausalConv1dKernel, float> conv_f32;
  static const OpT<CausalConv1dKernel, half_t> conv_f16;
  static const OpT<DecodeStepKernel, float> decode_f32;
  static const OpT<DecodeStepKernel, half_t> decode_f16;
  // The norms: (R, T) = (float32, float32), (float32, float16) (residual_in_fp32), (float16, float16).
  static const OpRT<RmsNormKernel, float, float> norm_f32;
  static const OpRT<RmsNormKernel, float, half_t> norm_f32_f16;
  static const OpRT<RmsNormKernel, half_t, half_t> norm_f16;
  static const OpRT<AddRmsNormKernel, float, float> add_norm_f32;
  static const OpRT<AddRmsNormKernel, float, half_t> add_norm_f32_f16;
  static const OpRT<AddRmsNormKernel, half_t, half_t> add_norm_f16;
  static const Op<LinearNarrowKernel<half_t>, float, float> linear_f16w;  // X float32, W float16: no type parameter
  static const Op<LinearNarrowKernel<int8_t>, float, float> linear_i8w;   // X float32, W int8, S float32
  // DecodeBlock: the norms' (R, T) combinations.
  static const OpRT<DecodeBlockKernel, float, float> block_f32;
  static const OpRT<DecodeBlockKernel, float, half_t> block_f32_f16;
  static const OpRT<DecodeBlockKernel, half_t, half_t> block_f16;
  // DecodeHead: the same combinations.
  static const OpRT<DecodeHeadKernel, float, float> head_f32;
  static const OpRT<DecodeHeadKernel, float, half_t> head_f32_f16;
  static const OpRT<DecodeHeadKernel, half_t, half_t> head_f16;
  return {&scan_f32, &scan_f16, &conv_f32, &conv_f16, &decode_f32, &decode_f16,
          &norm_f32, &norm_f32_f16, &norm_f16, &add_norm_f32, &add_norm_f32_f16, &add_norm_f16,
          &linear_f16w, &linear_i8w,
          &block_f32, &block_f32_f16, &block_f16, &head_f32, &head_f32_f16, &head_f16};
}

}  // namespace mamba_export_ops
