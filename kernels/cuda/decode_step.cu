// One decode step of a Mamba mixer between in_proj and out_proj, in two kernels on float32 intermediates:
//   1. conv_xproj: per tile of kTile channels and group of up to kBatchGroup sequences: shift the conv state, conv +
//      SiLU -> xc (workspace), then this tile's partial dot products of x_proj's r + 2n rows with xc (workspace:
//      partial[b, tile, row]), so that each weight row segment is read once per batch group.
//   2. scan: per (channel block, sequence): sum the partials in a fixed order (deterministic, no atomics) into
//      dbc = [dt_low_rank, B, C], dt = softplus(dt_proj . dt_low_rank + dt_bias), state update, y = C.h + D x, gate.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kTile = 256;        // channels per block of kernel 1 (one per thread)
constexpr int kBatchGroup = 8;    // sequences per block of kernel 1
constexpr int kScanThreads = 128;

__host__ __device__ inline int64_t tiles(int64_t dim) { return (dim + kTile - 1) / kTile; }

template <typename T>
__global__ void __launch_bounds__(kTile) conv_xproj_kernel(DecodeStepArgs a) {
  __shared__ float s_x[kBatchGroup][kTile];
  const int64_t E = a.dim, K = a.width, km1 = K - 1, R2 = a.dt_rank + 2 * a.dstate, T1 = tiles(E);
  const int64_t tile = blockIdx.x, b0 = static_cast<int64_t>(blockIdx.y) * kBatchGroup;
  const int nb = static_cast<int>(a.batch - b0 < kBatchGroup ? a.batch - b0 : kBatchGroup);
  const int64_t e = tile * kTile + threadIdx.x;
  const T* xz = static_cast<const T*>(a.xz);
  float* xc_out = a.workspace;
  float* partial = a.workspace + a.batch * E;

  for (int bb = 0; bb < kBatchGroup; ++bb) {
    float xc = 0.f;
    if (bb < nb && e < E) {
      const int64_t b = b0 + bb;
      const float* st = a.conv_state_in + (b * E + e) * km1;
      float* st_out = a.conv_state_out + (b * E + e) * km1;
      const float xnew = to_float(xz[b * 2 * E + e]);
      float acc = a.conv_bias[e];
      for (int64_t j = 0; j < km1; ++j) acc += a.conv_weight[e * K + j] * st[j];
      acc += a.conv_weight[e * K + km1] * xnew;
      for (int64_t j = 0; j + 1 < km1; ++j) st_out[j] = st[j + 1];
      if (km1 > 0) st_out[km1 - 1] = xnew;
      xc = silu(acc);
      xc_out[b * E + e] = xc;
    }
    s_x[bb][threadIdx.x] = xc;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kTile / 32;
  for (int64_t row = warp; row < R2; row += warps) {
    float acc[kBatchGroup];
#pragma unroll
    for (int bb = 0; bb < kBatchGroup; ++bb) acc[bb] = 0.f;
#pragma unroll
    for (int i = 0; i < kTile / 32; ++i) {
      const int c = lane + 32 * i;
      const int64_t ch = tile * kTile + c;
      const float w = ch < E ? a.x_proj_weight[row * E + ch] : 0.f;
#pragma unroll
      for (int bb = 0; bb < kBatchGroup; ++bb) acc[bb] += w * s_x[bb][c];
    }
#pragma unroll
    for (int bb = 0; bb < kBatchGroup; ++bb) {
      const float v = group_sum(acc[bb], 32);
      if (lane == 0 && bb < nb) partial[((b0 + bb) * T1 + tile) * R2 + row] = v;
    }
  }
}

template <typename T, int J>
__global__ void __launch_bounds__(kScanThreads) decode_scan_kernel(DecodeStepArgs a, int tpc) {
  extern __shared__ float smem[];
  const int64_t E = a.dim, N = a.dstate, R = a.dt_rank, R2 = R + 2 * N, T1 = tiles(E);
  const int cpb = kScanThreads / tpc;
  float* s_dbc = smem;        // [r + 2n]
  float* s_dt = smem + R2;    // [cpb]
  const int64_t b = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const float* xc = a.workspace;
  const float* partial = a.workspace + a.batch * E;

  for (int64_t row = threadIdx.x; row < R2; row += kScanThreads) {
    float sum = 0.f;
    for (int64_t t = 0; t < T1; ++t) sum += partial[(b * T1 + t) * R2 + row];
    s_dbc[row] = sum;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kScanThreads / 32;
  for (int c = warp; c < cpb; c += warps) {
    const int64_t e = c0 + c;
    float acc = 0.f;
    if (e < E) {
      for (int64_t k = lane; k < R; k += 32) acc += a.dt_proj_weight[e * R + k] * s_dbc[k];
    }
    acc = group_sum(acc, 32);
    if (lane == 0) s_dt[c] = e < E ? softplus(acc + a.dt_bias[e]) : 0.f;
  }
  __syncthreads();

  const int cl = threadIdx.x / tpc, sub = threadIdx.x % tpc;
  const int64_t e = c0 + cl;
  const bool active = e < E;
  const float x = active ? xc[b * E + e] : 0.f;
  const float dt = s_dt[cl];
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    if (active && st < N) {
      const int64_t idx = (b * E + e) * N + st;
      const float h = expf(dt * a.A[e * N + st]) * a.ssm_state_in[idx] + dt * x * s_dbc[R + st];
      a.ssm_state_out[idx] = h;
      acc += h * s_dbc[R + N + st];
    }
  }
  acc = group_sum(acc, tpc);
  if (sub == 0 && active) {
    const float z = to_float(static_cast<const T*>(a.xz)[b * 2 * E + E + e]);
    static_cast<T*>(a.y)[b * E + e] = from_float<T>((acc + a.D[e] * x) * silu(z));
  }
}

template <typename T, int J>
cudaError_t launch(const DecodeStepArgs& a, cudaStream_t stream) {
  const dim3 grid1(static_cast<unsigned>(tiles(a.dim)), ceil_div(a.batch, kBatchGroup));
  conv_xproj_kernel<T><<<grid1, kTile, 0, stream>>>(a);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const int tpc = next_pow2((a.dstate + J - 1) / J);
  const int cpb = kScanThreads / tpc;
  const size_t smem = (a.dt_rank + 2 * a.dstate + cpb) * sizeof(float);
  const dim3 grid2(ceil_div(a.dim, cpb), static_cast<unsigned>(a.batch));
  decode_scan_kernel<T, J><<<grid2, kScanThreads, smem, stream>>>(a, tpc);
  return cudaGetLastError();
}

}  // namespace

size_t decode_step_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank) {
  return static_cast<size_t>(batch * dim + batch * tiles(dim) * (dt_rank + 2 * dstate)) * sizeof(float);
}

cudaError_t decode_step(const DecodeStepArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.dim < 0 || a.dstate < 1 || a.dstate > kMaxDState || a.width < 1 || a.width > kMaxDConv ||
      a.dt_rank < 1 || a.batch > 65535 * kBatchGroup || a.batch > 65535 || a.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  const int J = a.dstate > 128 ? 8 : (a.dstate > 64 ? 4 : (a.dstate > 32 ? 2 : 1));
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (J) {
      case 1: return launch<T, 1>(a, stream);
      case 2: return launch<T, 2>(a, stream);
      case 4: return launch<T, 4>(a, stream);
      default: return launch<T, 8>(a, stream);
    }
  });
}

}  // namespace mamba_cuda
