// Causal depthwise convolution over time (prefill), continuing from a conv state of the previous k - 1 inputs.
// Grid: x over blocks of kThreads channels, y over (sequence, token) rows; one thread per output, channels fastest
// so that a warp reads and writes consecutive channels. No 64-bit division in the inner work.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRowsPerLaunch = 65535;  // grid.y limit; rows beyond it are covered by a loop

template <typename T>
__global__ void __launch_bounds__(kThreads) causal_conv1d_kernel(CausalConv1dArgs a) {
  const int64_t L = a.seqlen, E = a.dim, K = a.width, km1 = K - 1;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= E) return;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  float w[kMaxDConv];
#pragma unroll
  for (int j = 0; j < kMaxDConv; ++j) w[j] = j < K ? a.weight[e * K + j] : 0.f;
  const float bias = a.bias[e];
  for (int64_t row = blockIdx.y; row < a.batch * L; row += gridDim.y) {
    const int64_t b = row / L, t = row - b * L;
    float acc = bias;
#pragma unroll
    for (int j = 0; j < kMaxDConv; ++j) {
      if (j < K) {
        const int64_t p = t - km1 + j;  // input position; < 0: from the conv state (positions -(k-1) .. -1)
        const float v = p >= 0 ? to_float(x[(b * L + p) * E + e]) : a.state_in[(b * E + e) * km1 + km1 + p];
        acc += w[j] * v;
      }
    }
    y[row * E + e] = from_float<T>(a.silu ? silu(acc) : acc);
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
  if (a.batch < 0 || a.seqlen < 0 || a.dim < 0 || a.width < 1 || a.width > kMaxDConv) return cudaErrorInvalidValue;
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const unsigned channel_blocks = static_cast<unsigned>(ceil_div(a.dim, kThreads));
    if (a.seqlen > 0) {
      causal_conv1d_kernel<T><<<dim3(channel_blocks, rows_grid(a.batch * a.seqlen)), kThreads, 0, stream>>>(a);
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
