// onnxruntime binding of the CUDA kernels in kernels/cuda/: per op, validate every input (rank, shape against the
// others, dtype), allocate the outputs, take the CUDA EP's compute stream and launch. Errors come back as
// INVALID_ARGUMENT (bad inputs) or FAIL (CUDA errors) statuses naming the op; nothing throws across the C API.
#include "cuda_ops.h"

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_runtime_api.h>

#include "../src/ort/attributes.h"
#include "mamba_cuda.h"

namespace mamba_export_cuda {
namespace {

constexpr const char* kProvider = "CUDAExecutionProvider";
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "another dtype";
  }
}

mamba_cuda::DType to_dtype(ONNXTensorElementDataType t) {
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return mamba_cuda::DType::kFloat16;
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) return mamba_cuda::DType::kBFloat16;
  return mamba_cuda::DType::kFloat32;
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << "]";
  return s.str();
}

// An input or output of an op: its name and whether its dtype is T, or (for the norms) R, else float32.
struct Port {
  const char* name;
  bool is_t;
  bool is_r = false;
};

ONNXTensorElementDataType port_type(const Port& p, ONNXTensorElementDataType t, ONNXTensorElementDataType r) {
  return p.is_t ? t : p.is_r ? r : kF32;
}

struct Tensor {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  const void* data = nullptr;
};

// Per-call helper: reads inputs, checks them, creates outputs. Every method returns nullptr or an error status.
class Call {
 public:
  Call(const OrtApi& api, OrtKernelContext* ctx, const char* op) : api_(api), ctx_(ctx), op_(op) {}

  OrtStatus* error(OrtErrorCode code, const std::string& msg) const {
    return api_.CreateStatus(code, (std::string(op_) + " (CUDA): " + msg).c_str());
  }

  OrtStatus* read_inputs(const std::vector<Port>& ports, ONNXTensorElementDataType t, std::vector<Tensor>& out,
                         ONNXTensorElementDataType r = kF32) {
    size_t count = 0;
    if (OrtStatus* st = api_.KernelContext_GetInputCount(ctx_, &count)) return st;
    if (count != ports.size()) {
      return error(ORT_INVALID_ARGUMENT, "expected " + std::to_string(ports.size()) + " inputs, found " + std::to_string(count));
    }
    out.resize(count);
    for (size_t i = 0; i < count; ++i) {
      Tensor& x = out[i];
      if (OrtStatus* st = api_.KernelContext_GetInput(ctx_, i, &x.value)) return st;
      if (x.value == nullptr) return error(ORT_INVALID_ARGUMENT, std::string("input '") + ports[i].name + "' is missing");
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* st = api_.GetTensorTypeAndShape(x.value, &info)) return st;
      std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> guard(info, api_.ReleaseTensorTypeAndShapeInfo);
      size_t rank = 0;
      if (OrtStatus* st = api_.GetTensorElementType(info, &x.type)) return st;
      if (OrtStatus* st = api_.GetDimensionsCount(info, &rank)) return st;
      x.dims.resize(rank);
      if (OrtStatus* st = api_.GetDimensions(info, x.dims.data(), rank)) return st;
      void* data = nullptr;
      if (OrtStatus* st = api_.GetTensorMutableData(const_cast<OrtValue*>(x.value), &data)) return st;
      x.data = data;
      const ONNXTensorElementDataType want = port_type(ports[i], t, r);
      if (x.type != want) {
        return error(ORT_INVALID_ARGUMENT, std::string("input '") + ports[i].name + "' must be " + type_name(want) +
                                               ", found " + type_name(x.type));
      }
    }
    return nullptr;
  }

  // Checks `x`'s rank, then each dimension against `want` (-1: any value, then checked to be >= `min_dim`).
  OrtStatus* check(const Tensor& x, const char* name, const std::vector<int64_t>& want, const std::string& why = "",
                   int64_t min_dim = 0) const {
    if (x.dims.size() != want.size()) {
      return error(ORT_INVALID_ARGUMENT, std::string("input '") + name + "' must have rank " + std::to_string(want.size()) +
                                             ", found rank " + std::to_string(x.dims.size()) + " " + shape_str(x.dims));
    }
    for (size_t i = 0; i < want.size(); ++i) {
      if ((want[i] >= 0 && x.dims[i] != want[i]) || (want[i] < 0 && x.dims[i] < min_dim)) {
        std::vector<int64_t> shown = want;
        std::string expected = "[";
        for (size_t j = 0; j < shown.size(); ++j) {
          expected += (j ? ", " : "") + (shown[j] >= 0 ? std::to_string(shown[j]) : std::string(">=") + std::to_string(min_dim));
        }
        expected += "]";
        return error(ORT_INVALID_ARGUMENT, std::string("input '") + name + "' must have shape " + expected +
                                               (why.empty() ? "" : " (" + why + ")") + ", found " + shape_str(x.dims));
      }
    }
    return nullptr;
  }

  OrtStatus* output(size_t index, const std::vector<int64_t>& dims, void** data) {
    OrtValue* value = nullptr;
    if (OrtStatus* st = api_.KernelContext_GetOutput(ctx_, index, dims.data(), dims.size(), &value)) return st;
    if (value == nullptr) return error(ORT_FAIL, "could not create output " + std::to_string(index));
    return api_.GetTensorMutableData(value, data);
  }

  // The CUDA EP's compute stream, with the current device set to the one holding `on`.
  OrtStatus* stream(const Tensor& on, cudaStream_t* out) {
    void* s = nullptr;
    if (OrtStatus* st = api_.KernelContext_GetGPUComputeStream(ctx_, &s)) return st;
    if (s == nullptr) return error(ORT_FAIL, "no GPU compute stream: the node must run on the CUDA execution provider");
    *out = static_cast<cudaStream_t>(s);
    const OrtMemoryInfo* info = nullptr;
    if (OrtStatus* st = api_.GetTensorMemoryInfo(on.value, &info)) return st;
    int want = 0, current = -1;
    if (OrtStatus* st = api_.MemoryInfoGetId(info, &want)) return st;
    if (OrtStatus* st = cuda(cudaGetDevice(&current), "cudaGetDevice")) return st;
    if (current != want) return cuda(cudaSetDevice(want), "cudaSetDevice");
    return nullptr;
  }

  // Device scratch from the session's allocator for the device holding `on`; freed (stream-ordered, like
  // onnxruntime's own scratch buffers) when the Call ends.
  OrtStatus* scratch(const Tensor& on, size_t bytes, void** out) {
    const OrtMemoryInfo* info = nullptr;
    if (OrtStatus* st = api_.GetTensorMemoryInfo(on.value, &info)) return st;
    if (OrtStatus* st = api_.KernelContext_GetAllocator(ctx_, info, &allocator_)) return st;
    scratch_ = allocator_->Alloc(allocator_, bytes > 0 ? bytes : 16);
    if (scratch_ == nullptr) return error(ORT_FAIL, "could not allocate " + std::to_string(bytes) + " bytes of scratch");
    *out = scratch_;
    return nullptr;
  }

  OrtStatus* cuda(cudaError_t err, const char* what) const {
    if (err == cudaSuccess) return nullptr;
    return error(ORT_FAIL, std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }

  ~Call() {
    if (allocator_ != nullptr) {
      if (scratch_ != nullptr) allocator_->Free(allocator_, scratch_);
      api_.ReleaseAllocator(allocator_);
    }
  }

 private:
  const OrtApi& api_;
  OrtKernelContext* ctx_;
  const char* op_;
  OrtAllocator* allocator_ = nullptr;
  void* scratch_ = nullptr;
};

#define MAMBA_RETURN_IF(expr)            \
  do {                                   \
    if (OrtStatus* st_ = (expr)) return st_; \
  } while (0)

// Reads an int attribute, or `fallback` when the node does not set it.
int64_t int_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t v = fallback;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v)) {
    api.ReleaseStatus(st);
    return fallback;
  }
  return v;
}

// Reads op `name`'s epsilon attribute (a finite float >= 0; 1e-5 when the node does not set it) into `out`; an error
// status (which fails session creation) otherwise.
OrtStatus* epsilon_of(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out) {
  const std::string error = mamba_export_ops::read_epsilon(api, info, std::string(name) + " (CUDA)", out);
  return error.empty() ? nullptr : api.CreateStatus(ORT_INVALID_ARGUMENT, error.c_str());
}

OrtStatus* check_batch(const Call& call, int64_t b) {
  if (b > 65535) return call.error(ORT_INVALID_ARGUMENT, "batch " + std::to_string(b) + " exceeds the CUDA kernels' limit of 65535");
  return nullptr;
}

OrtStatus* check_dstate(const Call& call, int64_t n) {
  if (n < 1 || n > mamba_cuda::kMaxDState) {
    return call.error(ORT_INVALID_ARGUMENT, "d_state " + std::to_string(n) + " is outside the CUDA kernels' range [1, " +
                                                std::to_string(mamba_cuda::kMaxDState) + "]");
  }
  return nullptr;
}

OrtStatus* check_dconv(const Call& call, int64_t k) {
  if (k < 1 || k > mamba_cuda::kMaxDConv) {
    return call.error(ORT_INVALID_ARGUMENT, "d_conv " + std::to_string(k) + " is outside the CUDA kernels' range [1, " +
                                                std::to_string(mamba_cuda::kMaxDConv) + "]");
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
struct SelectiveScanKernel {
  static constexpr const char* kName = "SelectiveScan";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = {{"u", true}, {"delta", true}, {"A", false}, {"B", true}, {"C", true},
                                        {"D", false}, {"z", true}, {"delta_bias", false}, {"ssm_state_in", false}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = {{"y", true}, {"ssm_state_out", false}};
    return p;
  }

  SelectiveScanKernel(const OrtApi& api, const OrtKernelInfo* info, ONNXTensorElementDataType t)
      : api(api), t(t), softplus(int_attr(api, info, "delta_softplus", 1) != 0) {}

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in));
    const Tensor &u = in[0], &delta = in[1], &A = in[2], &B = in[3], &C = in[4], &D = in[5], &z = in[6],
                 &bias = in[7], &state = in[8];
    MAMBA_RETURN_IF(call.check(u, "u", {-1, -1, -1}, "[b, l, e]"));
    const int64_t b = u.dims[0], l = u.dims[1], e = u.dims[2];
    MAMBA_RETURN_IF(call.check(A, "A", {e, -1}, "[e, n], e from u", 1));
    const int64_t n = A.dims[1];
    MAMBA_RETURN_IF(check_batch(call, b));
    MAMBA_RETURN_IF(check_dstate(call, n));
    MAMBA_RETURN_IF(call.check(delta, "delta", {b, l, e}, "like u"));
    MAMBA_RETURN_IF(call.check(B, "B", {b, l, n}, "[b, l, n]"));
    MAMBA_RETURN_IF(call.check(C, "C", {b, l, n}, "[b, l, n]"));
    MAMBA_RETURN_IF(call.check(D, "D", {e}, "[e]"));
    MAMBA_RETURN_IF(call.check(z, "z", {b, l, e}, "like u"));
    MAMBA_RETURN_IF(call.check(bias, "delta_bias", {e}, "[e]"));
    MAMBA_RETURN_IF(call.check(state, "ssm_state_in", {b, e, n}, "[b, e, n]"));
    mamba_cuda::SelectiveScanArgs a{};
    a.dtype = to_dtype(t);
    a.batch = b, a.seqlen = l, a.dim = e, a.dstate = n, a.delta_softplus = softplus;
    a.u = u.data, a.delta = delta.data, a.A = static_cast<const float*>(A.data), a.B = B.data, a.C = C.data;
    a.D = static_cast<const float*>(D.data), a.z = z.data, a.delta_bias = static_cast<const float*>(bias.data);
    a.state_in = static_cast<const float*>(state.data);
    void *y = nullptr, *state_out = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, l, e}, &y));
    MAMBA_RETURN_IF(call.output(1, {b, e, n}, &state_out));
    a.y = y, a.state_out = static_cast<float*>(state_out);
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(u, &stream));  // sets the device, which the workspace plan reads
    if (const size_t bytes = mamba_cuda::selective_scan_workspace_bytes(a); bytes > 0) {
      void* ws = nullptr;
      MAMBA_RETURN_IF(call.scratch(u, bytes, &ws));
      a.workspace = static_cast<float*>(ws);
    }
    return call.cuda(mamba_cuda::selective_scan(a, stream), "selective_scan launch");
  }

  const OrtApi& api;
  ONNXTensorElementDataType t;
  bool softplus;
};

// ---------------------------------------------------------------------------------------------------------------
struct CausalConv1dKernel {
  static constexpr const char* kName = "CausalConv1d";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = {{"x", true}, {"conv_state_in", false}, {"weight", false}, {"bias", false}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = {{"y", true}, {"conv_state_out", false}};
    return p;
  }

  CausalConv1dKernel(const OrtApi& api, const OrtKernelInfo* info, ONNXTensorElementDataType t)
      : api(api), t(t), silu(int_attr(api, info, "silu", 1) != 0) {}

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in));
    const Tensor &x = in[0], &state = in[1], &weight = in[2], &bias = in[3];
    MAMBA_RETURN_IF(call.check(x, "x", {-1, -1, -1}, "[b, l, e]"));
    const int64_t b = x.dims[0], l = x.dims[1], e = x.dims[2];
    MAMBA_RETURN_IF(call.check(weight, "weight", {e, -1}, "[e, k], e from x", 1));
    const int64_t k = weight.dims[1];
    MAMBA_RETURN_IF(check_batch(call, b));
    MAMBA_RETURN_IF(check_dconv(call, k));
    MAMBA_RETURN_IF(call.check(state, "conv_state_in", {b, e, k - 1}, "[b, e, k - 1]"));
    MAMBA_RETURN_IF(call.check(bias, "bias", {e}, "[e]"));
    mamba_cuda::CausalConv1dArgs a{};
    a.dtype = to_dtype(t);
    a.batch = b, a.seqlen = l, a.dim = e, a.width = k, a.silu = silu;
    a.x = x.data, a.state_in = static_cast<const float*>(state.data);
    a.weight = static_cast<const float*>(weight.data), a.bias = static_cast<const float*>(bias.data);
    void *y = nullptr, *state_out = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, l, e}, &y));
    MAMBA_RETURN_IF(call.output(1, {b, e, k - 1}, &state_out));
    a.y = y, a.state_out = static_cast<float*>(state_out);
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(x, &stream));
    return call.cuda(mamba_cuda::causal_conv1d(a, stream), "causal_conv1d launch");
  }

  const OrtApi& api;
  ONNXTensorElementDataType t;
  bool silu;
};

// ---------------------------------------------------------------------------------------------------------------
// The mixer inputs DecodeStep and DecodeBlock share, m[0..8] = conv_state_in, ssm_state_in, conv_weight, conv_bias,
// x_proj_weight, dt_proj_weight, dt_bias, A, D (their order in both contracts): checked against batch b and channels
// e (`e_from` says which input gave e), then their sizes and pointers go into `a`.
OrtStatus* read_mixer(const Call& call, const Tensor* m, int64_t b, int64_t e, const std::string& e_from,
                      mamba_cuda::MixerStepArgs& a) {
  const Tensor &conv_state = m[0], &ssm_state = m[1], &conv_w = m[2], &conv_b = m[3], &xproj = m[4], &dtproj = m[5],
               &dt_bias = m[6], &A = m[7], &D = m[8];
  MAMBA_RETURN_IF(call.check(A, "A", {e, -1}, "[e, n], e from " + e_from, 1));
  const int64_t n = A.dims[1];
  MAMBA_RETURN_IF(call.check(conv_w, "conv_weight", {e, -1}, "[e, k]", 1));
  const int64_t k = conv_w.dims[1];
  MAMBA_RETURN_IF(call.check(dtproj, "dt_proj_weight", {e, -1}, "[e, r]", 1));
  const int64_t r = dtproj.dims[1];
  MAMBA_RETURN_IF(check_batch(call, b));
  MAMBA_RETURN_IF(check_dstate(call, n));
  MAMBA_RETURN_IF(check_dconv(call, k));
  MAMBA_RETURN_IF(call.check(conv_state, "conv_state_in", {b, e, k - 1}, "[b, e, k - 1]"));
  MAMBA_RETURN_IF(call.check(ssm_state, "ssm_state_in", {b, e, n}, "[b, e, n]"));
  MAMBA_RETURN_IF(call.check(conv_b, "conv_bias", {e}, "[e]"));
  MAMBA_RETURN_IF(call.check(xproj, "x_proj_weight", {r + 2 * n, e}, "[r + 2n, e]"));
  MAMBA_RETURN_IF(call.check(dt_bias, "dt_bias", {e}, "[e]"));
  MAMBA_RETURN_IF(call.check(D, "D", {e}, "[e]"));
  a.batch = b, a.dim = e, a.dstate = n, a.width = k, a.dt_rank = r;
  a.conv_state_in = static_cast<const float*>(conv_state.data);
  a.ssm_state_in = static_cast<const float*>(ssm_state.data);
  a.conv_weight = static_cast<const float*>(conv_w.data);
  a.conv_bias = static_cast<const float*>(conv_b.data);
  a.x_proj_weight = static_cast<const float*>(xproj.data);
  a.dt_proj_weight = static_cast<const float*>(dtproj.data);
  a.dt_bias = static_cast<const float*>(dt_bias.data);
  a.A = static_cast<const float*>(A.data);
  a.D = static_cast<const float*>(D.data);
  return nullptr;
}

// Creates the mixer's new conv and ssm states as outputs `first` and `first + 1` of the node (sizes from `a`).
OrtStatus* mixer_outputs(Call& call, size_t first, mamba_cuda::MixerStepArgs& a) {
  void *conv_out = nullptr, *ssm_out = nullptr;
  MAMBA_RETURN_IF(call.output(first, {a.batch, a.dim, a.width - 1}, &conv_out));
  MAMBA_RETURN_IF(call.output(first + 1, {a.batch, a.dim, a.dstate}, &ssm_out));
  a.conv_state_out = static_cast<float*>(conv_out), a.ssm_state_out = static_cast<float*>(ssm_out);
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
struct DecodeStepKernel {
  static constexpr const char* kName = "DecodeStep";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = {{"xz", true},           {"conv_state_in", false},  {"ssm_state_in", false},
                                        {"conv_weight", false}, {"conv_bias", false},      {"x_proj_weight", false},
                                        {"dt_proj_weight", false}, {"dt_bias", false},     {"A", false},
                                        {"D", false}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = {{"y", true}, {"conv_state_out", false}, {"ssm_state_out", false}};
    return p;
  }

  DecodeStepKernel(const OrtApi& api, const OrtKernelInfo*, ONNXTensorElementDataType t) : api(api), t(t) {}

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in));
    const Tensor& xz = in[0];
    MAMBA_RETURN_IF(call.check(xz, "xz", {-1, 1, -1}, "[b, 1, 2e]"));
    const int64_t b = xz.dims[0];
    if (xz.dims[2] % 2 != 0) {
      return call.error(ORT_INVALID_ARGUMENT, "input 'xz' must have an even last dimension (x then z), found " + shape_str(xz.dims));
    }
    const int64_t e = xz.dims[2] / 2;
    mamba_cuda::DecodeStepArgs a{};
    MAMBA_RETURN_IF(read_mixer(call, &in[1], b, e, "xz", a));
    a.dtype = to_dtype(t);
    a.xz = xz.data;
    void *y = nullptr, *ws = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, 1, e}, &y));
    MAMBA_RETURN_IF(mixer_outputs(call, 1, a));
    a.y = y;
    if (b == 0 || e == 0) return nullptr;
    MAMBA_RETURN_IF(call.scratch(xz, mamba_cuda::decode_step_workspace_bytes(b, e, a.dstate, a.dt_rank), &ws));
    a.workspace = static_cast<float*>(ws);
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(xz, &stream));
    return call.cuda(mamba_cuda::decode_step(a, stream), "decode_step launch");
  }

  const OrtApi& api;
  ONNXTensorElementDataType t;
};

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm (kAdd false) and AddRMSNorm (kAdd true): activations/weight T, residual stream R (float32 or T).
template <bool kAdd>
struct NormKernel {
  static constexpr const char* kName = kAdd ? "AddRMSNorm" : "RMSNorm";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = kAdd ? std::vector<Port>{{"x", true}, {"residual", false, true}, {"weight", true}}
                                            : std::vector<Port>{{"x", false, true}, {"weight", true}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = kAdd ? std::vector<Port>{{"y", true}, {"residual_out", false, true}}
                                            : std::vector<Port>{{"y", true}};
    return p;
  }

  NormKernel(const OrtApi& api, const OrtKernelInfo*, ONNXTensorElementDataType t, ONNXTensorElementDataType r)
      : api(api), t(t), r(r) {}

  OrtStatus* init(const OrtKernelInfo* info) { return epsilon_of(api, info, kName, &epsilon); }

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in, r));
    const Tensor& x = in[0];
    const Tensor& residual = kAdd ? in[1] : in[0];
    const Tensor& weight = kAdd ? in[2] : in[1];
    MAMBA_RETURN_IF(call.check(x, "x", {-1, -1, -1}, "[b, l, d], none empty", 1));
    const int64_t b = x.dims[0], l = x.dims[1], d = x.dims[2];
    if (kAdd) MAMBA_RETURN_IF(call.check(residual, "residual", {b, l, d}, "[b, l, d] like x"));
    MAMBA_RETURN_IF(call.check(weight, "weight", {d}, "[d]"));
    mamba_cuda::RmsNormArgs a{};
    a.dtype = to_dtype(t);
    a.residual_dtype = to_dtype(r);
    a.rows = b * l, a.dim = d, a.epsilon = epsilon;
    a.x = kAdd ? x.data : nullptr;
    a.residual = residual.data;
    a.weight = weight.data;
    void *y = nullptr, *residual_out = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, l, d}, &y));
    if (kAdd) MAMBA_RETURN_IF(call.output(1, {b, l, d}, &residual_out));
    a.y = y, a.residual_out = residual_out;
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(x, &stream));
    return call.cuda(mamba_cuda::rms_norm(a, stream), "rms_norm launch");
  }

  const OrtApi& api;
  ONNXTensorElementDataType t, r;
  float epsilon = 1e-5f;
};

// Whether the inputs at `indices` are all constant initializers of the graph.
bool constant_inputs(const OrtApi& api, const OrtKernelInfo* info, std::initializer_list<size_t> indices) {
  for (size_t index : indices) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
      api.ReleaseStatus(st);
      return false;
    }
    if (is_constant == 0) return false;
  }
  return true;
}

// What DecodeBlock and DecodeHead keep: T, R, epsilon, and whether the weights the kernel may read early (mamba_cuda.h,
// constant_weights) are constant initializers of the graph.
struct FusedDecodeKernel {
  FusedDecodeKernel(const OrtApi& api, const OrtKernelInfo*, ONNXTensorElementDataType t, ONNXTensorElementDataType r)
      : api(api), t(t), r(r) {}

  OrtStatus* init_fused(const OrtKernelInfo* info, const char* name, std::initializer_list<size_t> early_weights) {
    constant_weights = constant_inputs(api, info, early_weights);
    return epsilon_of(api, info, name, &epsilon);
  }

  const OrtApi& api;
  ONNXTensorElementDataType t, r;
  float epsilon = 1e-5f;
  bool constant_weights = false;
};

// ---------------------------------------------------------------------------------------------------------------
// DecodeBlock: one whole decode layer (AddRMSNorm, in_proj, DecodeStep, out_proj); activations and the norm, in_proj
// and out_proj weights T, residual stream R (float32 or T), the rest float32.
struct DecodeBlockKernel : FusedDecodeKernel {
  static constexpr const char* kName = "DecodeBlock";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = {
        {"x", true},           {"residual", false, true}, {"norm_weight", true},    {"in_proj_weight", true},
        {"conv_state_in", false}, {"ssm_state_in", false}, {"conv_weight", false}, {"conv_bias", false},
        {"x_proj_weight", false}, {"dt_proj_weight", false}, {"dt_bias", false},   {"A", false},
        {"D", false},          {"out_proj_weight", true}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = {
        {"out", true}, {"residual_out", false, true}, {"conv_state_out", false}, {"ssm_state_out", false}};
    return p;
  }

  using FusedDecodeKernel::FusedDecodeKernel;

  // The weights read early: norm_weight, in_proj_weight, conv_weight, conv_bias, x_proj_weight.
  OrtStatus* init(const OrtKernelInfo* info) { return init_fused(info, kName, {2, 3, 6, 7, 8}); }

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in, r));
    const Tensor &x = in[0], &residual = in[1], &norm_w = in[2], &in_proj = in[3], &out_proj = in[13];
    MAMBA_RETURN_IF(call.check(x, "x", {-1, 1, -1}, "[b, 1, d]"));
    const int64_t b = x.dims[0], d = x.dims[2];
    if (d < 1) return call.error(ORT_INVALID_ARGUMENT, "input 'x' must have a non-empty last dimension, found " + shape_str(x.dims));
    // One residual row per sequence, or one row for all (the exporter's zero residual of layer 0).
    const bool shared_residual = residual.dims.size() == 3 && residual.dims[0] == 1;
    MAMBA_RETURN_IF(call.check(residual, "residual", {shared_residual ? 1 : b, 1, d}, "[b, 1, d] like x, or [1, 1, d]"));
    MAMBA_RETURN_IF(call.check(norm_w, "norm_weight", {d}, "[d]"));
    MAMBA_RETURN_IF(call.check(in_proj, "in_proj_weight", {-1, d}, "[2e, d]", 2));
    if (in_proj.dims[0] % 2 != 0) {
      return call.error(ORT_INVALID_ARGUMENT, "input 'in_proj_weight' must have an even first dimension (x rows then z rows), found " + shape_str(in_proj.dims));
    }
    const int64_t e = in_proj.dims[0] / 2;
    mamba_cuda::DecodeBlockArgs a{};
    MAMBA_RETURN_IF(read_mixer(call, &in[4], b, e, "in_proj_weight", a));
    MAMBA_RETURN_IF(call.check(out_proj, "out_proj_weight", {d, e}, "[d, e]"));
    a.dtype = to_dtype(t);
    a.residual_dtype = to_dtype(r);
    a.dmodel = d, a.epsilon = epsilon, a.constant_weights = constant_weights, a.residual_broadcast = shared_residual;
    a.x = x.data, a.residual = residual.data, a.norm_weight = norm_w.data, a.in_proj_weight = in_proj.data;
    a.out_proj_weight = out_proj.data;
    void *out = nullptr, *residual_out = nullptr, *ws = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, 1, d}, &out));
    MAMBA_RETURN_IF(call.output(1, {b, 1, d}, &residual_out));
    MAMBA_RETURN_IF(mixer_outputs(call, 2, a));
    a.out = out, a.residual_out = residual_out;
    if (b == 0) return nullptr;
    MAMBA_RETURN_IF(call.scratch(x, mamba_cuda::decode_block_workspace_bytes(b, e, a.dstate, a.dt_rank), &ws));
    a.workspace = static_cast<float*>(ws);
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(x, &stream));
    return call.cuda(mamba_cuda::decode_block(a, stream), "decode_block launch");
  }
};

// ---------------------------------------------------------------------------------------------------------------
// DecodeHead: the decode step's tail (AddRMSNorm, then the LM head's product); x, norm_weight, weight and logits T,
// residual R (float32 or T).
struct DecodeHeadKernel : FusedDecodeKernel {
  static constexpr const char* kName = "DecodeHead";
  static const std::vector<Port>& inputs() {
    static const std::vector<Port> p = {{"x", true}, {"residual", false, true}, {"norm_weight", true}, {"weight", true}};
    return p;
  }
  static const std::vector<Port>& outputs() {
    static const std::vector<Port> p = {{"logits", true}};
    return p;
  }

  using FusedDecodeKernel::FusedDecodeKernel;

  OrtStatus* init(const OrtKernelInfo* info) { return init_fused(info, kName, {2, 3}); }  // norm_weight, weight

  OrtStatus* Compute(OrtKernelContext* ctx) {
    Call call(api, ctx, kName);
    std::vector<Tensor> in;
    MAMBA_RETURN_IF(call.read_inputs(inputs(), t, in, r));
    const Tensor &x = in[0], &residual = in[1], &norm_w = in[2], &weight = in[3];
    MAMBA_RETURN_IF(call.check(x, "x", {-1, 1, -1}, "[b, 1, d]"));
    const int64_t b = x.dims[0], d = x.dims[2];
    if (d < 1) return call.error(ORT_INVALID_ARGUMENT, "input 'x' must have a non-empty last dimension, found " + shape_str(x.dims));
    MAMBA_RETURN_IF(call.check(residual, "residual", {b, 1, d}, "[b, 1, d] like x"));
    MAMBA_RETURN_IF(call.check(norm_w, "norm_weight", {d}, "[d]"));
    MAMBA_RETURN_IF(call.check(weight, "weight", {-1, d}, "[V, d]", 1));
    const int64_t vocab = weight.dims[0];
    void* logits = nullptr;
    MAMBA_RETURN_IF(call.output(0, {b, 1, vocab}, &logits));
    if (b == 0) return nullptr;
    mamba_cuda::DecodeHeadArgs a{};
    a.dtype = to_dtype(t);
    a.residual_dtype = to_dtype(r);
    a.batch = b, a.dmodel = d, a.vocab = vocab, a.epsilon = epsilon, a.constant_weights = constant_weights;
    a.x = x.data, a.residual = residual.data, a.norm_weight = norm_w.data, a.weight = weight.data, a.logits = logits;
    cudaStream_t stream = nullptr;
    MAMBA_RETURN_IF(call.stream(x, &stream));
    return call.cuda(mamba_cuda::decode_head(a, stream), "decode_head launch");
  }
};

// Kernels of the three Mamba ops take (api, info, T); the norms and DecodeBlock also take R and check their attribute
// in init().
template <typename Kernel>
OrtStatus* create_kernel(const OrtApi& api, const OrtKernelInfo* info, ONNXTensorElementDataType t,
                         ONNXTensorElementDataType r, void** out) {
  if constexpr (std::is_constructible_v<Kernel, const OrtApi&, const OrtKernelInfo*, ONNXTensorElementDataType,
                                        ONNXTensorElementDataType>) {
    auto kernel = std::make_unique<Kernel>(api, info, t, r);
    if (OrtStatus* st = kernel->init(info)) return st;
    *out = kernel.release();
  } else {
    *out = new Kernel(api, info, t);
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------------
// One OrtCustomOp per (op, T[, R]), filled in by hand so that this file needs only the C API.
template <typename Kernel>
struct CudaOp : OrtCustomOp {
  explicit CudaOp(ONNXTensorElementDataType t_, ONNXTensorElementDataType r_ = kF32) : OrtCustomOp{}, t(t_), r(r_) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return Kernel::kName; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return kProvider; };
    GetInputTypeCount = [](const OrtCustomOp*) { return Kernel::inputs().size(); };
    GetOutputTypeCount = [](const OrtCustomOp*) { return Kernel::outputs().size(); };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      const auto* self = static_cast<const CudaOp*>(op);
      return port_type(Kernel::inputs()[i], self->t, self->r);
    };
    GetOutputType = [](const OrtCustomOp* op, size_t i) {
      const auto* self = static_cast<const CudaOp*>(op);
      return port_type(Kernel::outputs()[i], self->t, self->r);
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel) -> OrtStatusPtr {
      const auto* self = static_cast<const CudaOp*>(op);
      return create_kernel<Kernel>(*api, info, self->t, self->r, kernel);
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      return static_cast<Kernel*>(kernel)->Compute(ctx);
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  }
  ONNXTensorElementDataType t, r;
};

}  // namespace
}  // namespace mamba_export_cuda

namespace mamba_export_ops {

std::vector<const OrtCustomOp*> cuda_ops() {
  using mamba_export_cuda::CudaOp;
  static const CudaOp<mamba_export_cuda::SelectiveScanKernel> scan[] = {
      CudaOp<mamba_export_cuda::SelectiveScanKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
      CudaOp<mamba_export_cuda::SelectiveScanKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
      CudaOp<mamba_export_cuda::SelectiveScanKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)};
  static const CudaOp<mamba_export_cuda::CausalConv1dKernel> conv[] = {
      CudaOp<mamba_export_cuda::CausalConv1dKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
      CudaOp<mamba_export_cuda::CausalConv1dKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
      CudaOp<mamba_export_cuda::CausalConv1dKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)};
  static const CudaOp<mamba_export_cuda::DecodeStepKernel> step[] = {
      CudaOp<mamba_export_cuda::DecodeStepKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
      CudaOp<mamba_export_cuda::DecodeStepKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
      CudaOp<mamba_export_cuda::DecodeStepKernel>(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)};
  // The norms: (T, R) = (T, float32) for each T, and (T, T) for float16 and bfloat16 (float32 is already there).
  using mamba_export_cuda::NormKernel;
  constexpr ONNXTensorElementDataType f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, f16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                      bf16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  static const CudaOp<NormKernel<false>> norm[] = {
      CudaOp<NormKernel<false>>(f32, f32), CudaOp<NormKernel<false>>(f16, f32), CudaOp<NormKernel<false>>(bf16, f32),
      CudaOp<NormKernel<false>>(f16, f16), CudaOp<NormKernel<false>>(bf16, bf16)};
  static const CudaOp<NormKernel<true>> add_norm[] = {
      CudaOp<NormKernel<true>>(f32, f32), CudaOp<NormKernel<true>>(f16, f32), CudaOp<NormKernel<true>>(bf16, f32),
      CudaOp<NormKernel<true>>(f16, f16), CudaOp<NormKernel<true>>(bf16, bf16)};
  static const CudaOp<mamba_export_cuda::DecodeBlockKernel> block[] = {
      CudaOp<mamba_export_cuda::DecodeBlockKernel>(f32, f32), CudaOp<mamba_export_cuda::DecodeBlockKernel>(f16, f32),
      CudaOp<mamba_export_cuda::DecodeBlockKernel>(bf16, f32), CudaOp<mamba_export_cuda::DecodeBlockKernel>(f16, f16),
      CudaOp<mamba_export_cuda::DecodeBlockKernel>(bf16, bf16)};
  static const CudaOp<mamba_export_cuda::DecodeHeadKernel> head[] = {
      CudaOp<mamba_export_cuda::DecodeHeadKernel>(f32, f32), CudaOp<mamba_export_cuda::DecodeHeadKernel>(f16, f32),
      CudaOp<mamba_export_cuda::DecodeHeadKernel>(bf16, f32), CudaOp<mamba_export_cuda::DecodeHeadKernel>(f16, f16),
      CudaOp<mamba_export_cuda::DecodeHeadKernel>(bf16, bf16)};
  std::vector<const OrtCustomOp*> ops;
  for (const auto& op : scan) ops.push_back(&op);
  for (const auto& op : conv) ops.push_back(&op);
  for (const auto& op : step) ops.push_back(&op);
  for (const auto& op : norm) ops.push_back(&op);
  for (const auto& op : add_norm) ops.push_back(&op);
  for (const auto& op : block) ops.push_back(&op);
  for (const auto& op : head) ops.push_back(&op);
  return ops;
}

}  // namespace mamba_export_ops
