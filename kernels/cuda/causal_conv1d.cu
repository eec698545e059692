// Causal depthwise convolution over time (prefill), continuing from a conv state of the previous k - 1 inputs.
// One thread per output element, channels fastest so that a warp reads and writes consecutive channels.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 256;

// Input at position p of the sequence (p < 0: from the conv state, which holds positions -(k-1) .. -1).
template <typename T>
__device__ __forceinline__ float input_at(const T* x, const float* state, int64_t b, int64_t p, int64_t e,
                                          int64_t L, int64_t E, int64_t km1) {
  return p >= 0 ? to_float(x[(b * L + p) * E + e]) : state[(b * E + e) * km1 + km1 + p];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) causal_conv1d_kernel(CausalConv1dArgs a) {
  const int64_t L = a.seqlen, E = a.dim, K = a.width, km1 = K - 1;
  const int64_t total = a.batch * L * E;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = i % E, t = (i / E) % L, b = i / (E * L);
    float acc = a.bias[e];
    for (int64_t j = 0; j < K; ++j) acc += a.weight[e * K + j] * input_at(x, a.state_in, b, t - km1 + j, e, L, E, km1);
    y[i] = from_float<T>(a.silu ? silu(acc) : acc);
  }
}

// conv_state_out[b, e, j] = input at position l - (k - 1) + j.
template <typename T>
__global__ void __launch_bounds__(kThreads) conv_state_kernel(CausalConv1dArgs a) {
  const int64_t L = a.seqlen, E = a.dim, km1 = a.width - 1;
  const int64_t total = a.batch * E * km1;
  const T* x = static_cast<const T*>(a.x);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t j = i % km1, e = (i / km1) % E, b = i / (km1 * E);
    a.state_out[i] = input_at(x, a.state_in, b, L - km1 + j, e, L, E, km1);
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < (1 << 20) ? blocks : (1 << 20));
}

}  // namespace

cudaError_t causal_conv1d(const CausalConv1dArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.seqlen < 0 || a.dim < 0 || a.width < 1 || a.width > kMaxDConv) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const int64_t outputs = a.batch * a.seqlen * a.dim, states = a.batch * a.dim * (a.width - 1);
    if (outputs > 0) {
      causal_conv1d_kernel<T><<<grid_for(outputs), kThreads, 0, stream>>>(a);
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    if (states > 0) {
      conv_state_kernel<T><<<grid_for(states), kThreads, 0, stream>>>(a);
      if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace mamba_cuda
