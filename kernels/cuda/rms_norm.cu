// RMSNorm and AddRMSNorm (see mamba_cuda.h): one block per row. Each thread takes the row's elements
// threadIdx.x + k * blockDim.x, keeps up to kItems of them in registers between the two passes (sum of squares, then
// scale), and the block reduces the sum of squares with warp shuffles and one shared-memory step. Rows wider than
// kItems * blockDim.x (d > 8192) read the rest again in the second pass. float32 arithmetic throughout.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kItems = 8;                    // elements per thread held in registers
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // grid.x cap; rows beyond it are covered by a loop

// Sum of `v` over the block (blockDim.x a multiple of 32); every thread gets the result. `warp_sums` has 32 slots.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = group_sum(v, 32);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? warp_sums[lane] : 0.f;
    w = group_sum(w, 32);
    if (lane == 0) warp_sums[0] = w;
  }
  __syncthreads();
  const float total = warp_sums[0];
  __syncthreads();  // the slots are written again for the next row
  return total;
}

template <typename R, typename T, bool kAdd>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(RmsNormArgs a) {
  __shared__ float warp_sums[32];
  const int64_t d = a.dim;
  const int64_t stride = blockDim.x;
  const T* __restrict__ weight = static_cast<const T*>(a.weight);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const R* __restrict__ in = static_cast<const R*>(a.residual) + row * d;
    const T* __restrict__ x = kAdd ? static_cast<const T*>(a.x) + row * d : nullptr;
    R* __restrict__ sum = kAdd ? static_cast<R*>(a.residual_out) + row * d : nullptr;
    T* __restrict__ y = static_cast<T*>(a.y) + row * d;

    // Pass 1: (add and round,) square and sum. v[k] keeps the normalised input of element threadIdx.x + k * stride.
    float v[kItems];
    float squares = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = threadIdx.x + k * stride;
      float r = 0.f;
      if (i < d) {
        r = to_float(in[i]);
        if constexpr (kAdd) {
          const R rounded = from_float<R>(r + to_float(x[i]));
          sum[i] = rounded;
          r = to_float(rounded);
        }
      }
      v[k] = r;
      squares += r * r;
    }
    for (int64_t i = threadIdx.x + kItems * stride; i < d; i += stride) {  // only rows wider than kItems * stride
      float r = to_float(in[i]);
      if constexpr (kAdd) {
        const R rounded = from_float<R>(r + to_float(x[i]));
        sum[i] = rounded;
        r = to_float(rounded);
      }
      squares += r * r;
    }
    const float scale = 1.f / sqrtf(block_sum(squares, warp_sums) / static_cast<float>(d) + a.epsilon);

    // Pass 2: scale by the norm and the weight.
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = threadIdx.x + k * stride;
      if (i < d) y[i] = from_float<T>(v[k] * scale * to_float(weight[i]));
    }
    for (int64_t i = threadIdx.x + kItems * stride; i < d; i += stride) {
      const float r = kAdd ? to_float(sum[i]) : to_float(in[i]);  // this thread wrote sum[i] in pass 1
      y[i] = from_float<T>(r * scale * to_float(weight[i]));
    }
  }
}

// Threads per block: about 4 elements per thread, a power of two from 32 to 1024 (768 values: 256 threads x 3).
int threads_for(int64_t dim) {
  const int64_t want = (dim + 3) / 4;
  return want >= kMaxThreads ? kMaxThreads : (next_pow2(want) < 32 ? 32 : next_pow2(want));
}

template <typename R, typename T>
cudaError_t launch(const RmsNormArgs& a, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(a.rows < kMaxBlocks ? a.rows : kMaxBlocks);
  const int threads = threads_for(a.dim);
  if (a.x != nullptr) {
    rms_norm_kernel<R, T, true><<<blocks, threads, 0, stream>>>(a);
  } else {
    rms_norm_kernel<R, T, false><<<blocks, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.dim < 0 || !(a.epsilon >= 0.f) || a.residual == nullptr || a.weight == nullptr ||
      a.y == nullptr || (a.x != nullptr && a.residual_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.residual_dtype != DType::kFloat32 && a.residual_dtype != a.dtype) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.dim == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return a.residual_dtype == DType::kFloat32 ? launch<float, T>(a, stream) : launch<T, T>(a, stream);
  });
}

}  // namespace mamba_cuda
