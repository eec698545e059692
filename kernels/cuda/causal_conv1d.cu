// Causal depthwise convolution over time (prefill), continuing from a conv state of the previous k - 1 inputs.
// Grid: x over blocks of kThreads channels, y over runs of tokens, z over sequences; channels fastest so that a warp
// reads and writes consecutive channels.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRowsPerLaunch = 65535;  // grid.y limit; rows beyond it are covered by a loop
constexpr int kTokensPerThread = 32;

// Thread: one channel over a run of kTokensPerThread tokens, the last KW - 1 inputs kept in registers (right-aligned:
// win[KW - 2] is the previous token), so each input is loaded once. KW is the register window (>= k): 4 or 16.
template <typename T, int KW>
__global__ void __launch_bounds__(kThreads) causal_conv1d_kernel(CausalConv1dArgs a) {
  const int64_t L = a.seqlen, E = a.dim, K = a.width, km1 = K - 1;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= E) return;
  const int64_t b = blockIdx.z;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTokensPerThread;
  const int64_t t1 = t0 + kTokensPerThread < L ? t0 + kTokensPerThread : L;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  // wr[i] multiplies the input i tokens back (wr[0]: the current one); zero beyond the filter.
  float wr[KW], win[KW - 1];
#pragma unroll
  for (int i = 0; i < KW; ++i) wr[i] = i < K ? a.weight[e * K + (K - 1 - i)] : 0.f;
#pragma unroll
  for (int i = 1; i < KW; ++i) {  // win[KW - 1 - i] = input at t0 - i
    const int64_t p = t0 - i;
    float v = 0.f;
    if (i <= km1) v = p >= 0 ? to_float(x[(b * L + p) * E + e]) : a.state_in[(b * E + e) * km1 + km1 + p];
    win[KW - 1 - i] = v;
  }
  const float bias = a.bias[e];
  for (int64_t t = t0; t < t1; ++t) {
    const float xt = to_float(x[(b * L + t) * E + e]);
    float acc = bias + wr[0] * xt;
#pragma unroll
    for (int i = 1; i < KW; ++i) acc += wr[i] * win[KW - 1 - i];
#pragma unroll
    for (int j = 0; j + 1 < KW - 1; ++j) win[j] = win[j + 1];
    win[KW - 2] = xt;
    y[(b * L + t) * E + e] = from_float<T>(a.silu ? silu(acc) : acc);
  }
}

// conv_state_out[b, e, j] = input at position l - (k - 1) + j. Grid: x over channel blocks, y over sequences.
template <typename T>
__global__ void __launch_bounds__(kThreads) conv_state_kernel(CausalConv1dArgs a) {
  const int64_t L = a.seqlen, E = a.dim, km1 = a.width - 1;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= E) return;
  const T* x = static_cast<const T*>(a.x);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    for (int64_t j = 0; j < km1; ++j) {
      const int64_t p = L - km1 + j;
      a.state_out[(b * E + e) * km1 + j] =
          p >= 0 ? to_float(x[(b * L + p) * E + e]) : a.state_in[(b * E + e) * km1 + km1 + p];
    }
  }
}

unsigned rows_grid(int64_t rows) { return static_cast<unsigned>(rows < kMaxRowsPerLaunch ? rows : kMaxRowsPerLaunch); }

}  // namespace

cudaError_t causal_conv1d(const CausalConv1dArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.seqlen < 0 || a.dim < 0 || a.width < 1 || a.width > kMaxDConv || a.batch > 65535 ||
      ceil_div(a.seqlen, kTokensPerThread) > 65535) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const unsigned channel_blocks = static_cast<unsigned>(ceil_div(a.dim, kThreads));
    if (a.seqlen > 0) {
      const dim3 grid(channel_blocks, static_cast<unsigned>(ceil_div(a.seqlen, kTokensPerThread)),
                      static_cast<unsigned>(a.batch));
      if (a.width <= 4) {
        causal_conv1d_kernel<T, 4><<<grid, kThreads, 0, stream>>>(a);
      } else {
        causal_conv1d_kernel<T, kMaxDConv><<<grid, kThreads, 0, stream>>>(a);
      }
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    if (a.width > 1) {
      conv_state_kernel<T><<<dim3(channel_blocks, rows_grid(a.batch)), kThreads, 0, stream>>>(a);
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace mamba_cuda
