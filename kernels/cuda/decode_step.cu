// One decode step of a Mamba mixer between in_proj and out_proj, in three kernels on float32 intermediates:
//   1. conv_xproj: per tile of kTile channels, group of kRows x_proj rows and group of up to kBatchGroup sequences:
//      shift the conv state, conv + SiLU -> xc (the first row group writes xc and the new conv state), then this
//      tile's partial dot products of its rows with xc -> partial[b, tile, row]. Each weight element is read once per
//      batch group, with all of a warp's loads in flight together; the grid is tiles x row groups x batch groups.
//   2. reduce_xproj: dbc[b, row] = sum over tiles of the partials, in a fixed order (deterministic, no atomics).
//   3. scan: per (channel block, sequence): dt = softplus(dt_proj . dbc[:r] + dt_bias), state update with
//      B = dbc[r:r+n], C = dbc[r+n:], y = C.h + D x, gate silu(z).
// Workspace (float32): xc [b, e], partial [b, tiles, r + 2n], dbc [b, r + 2n].
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kTile = 128;        // channels per block of kernel 1 (4 per lane of each warp)
constexpr int kWarps = kTile / 32;
constexpr int kRowsPerWarp = 4;   // x_proj rows per warp of kernel 1, loaded together
constexpr int kRows = kWarps * kRowsPerWarp;
constexpr int kBatchGroup = 8;    // sequences per block of kernel 1
constexpr int kScanThreads = 128;

__host__ __device__ inline int64_t tiles(int64_t dim) { return (dim + kTile - 1) / kTile; }

struct Workspace {
  float* xc;
  float* partial;
  float* dbc;
};

__host__ __device__ inline Workspace split_workspace(const DecodeStepArgs& a) {
  const int64_t R2 = a.dt_rank + 2 * a.dstate;
  Workspace w;
  w.xc = a.workspace;
  w.partial = w.xc + a.batch * a.dim;
  w.dbc = w.partial + a.batch * tiles(a.dim) * R2;
  return w;
}

template <typename T>
__global__ void __launch_bounds__(kTile) conv_xproj_kernel(DecodeStepArgs a) {
  __shared__ float s_x[kBatchGroup][kTile];
  const int64_t E = a.dim, K = a.width, km1 = K - 1, R2 = a.dt_rank + 2 * a.dstate, T1 = tiles(E);
  const int64_t tile = blockIdx.x, b0 = static_cast<int64_t>(blockIdx.y) * kBatchGroup;
  const int64_t row0 = static_cast<int64_t>(blockIdx.z) * kRows;
  const int nb = static_cast<int>(a.batch - b0 < kBatchGroup ? a.batch - b0 : kBatchGroup);
  const int64_t e = tile * kTile + threadIdx.x;
  const bool writer = blockIdx.z == 0;  // one row group writes xc and the conv state
  const T* xz = static_cast<const T*>(a.xz);
  const Workspace ws = split_workspace(a);

  for (int bb = 0; bb < kBatchGroup; ++bb) {
    float xc = 0.f;
    if (bb < nb && e < E) {
      const int64_t b = b0 + bb;
      const float* st = a.conv_state_in + (b * E + e) * km1;
      const float xnew = to_float(xz[b * 2 * E + e]);
      float acc = a.conv_bias[e] + a.conv_weight[e * K + km1] * xnew;
      for (int64_t j = 0; j < km1; ++j) acc += a.conv_weight[e * K + j] * st[j];
      xc = silu(acc);
      if (writer) {
        float* st_out = a.conv_state_out + (b * E + e) * km1;
        for (int64_t j = 0; j + 1 < km1; ++j) st_out[j] = st[j + 1];
        if (km1 > 0) st_out[km1 - 1] = xnew;
        ws.xc[b * E + e] = xc;
      }
    }
    s_x[bb][threadIdx.x] = xc;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float w[kRowsPerWarp][kTile / 32];
#pragma unroll
  for (int q = 0; q < kRowsPerWarp; ++q) {
    const int64_t row = row0 + warp * kRowsPerWarp + q;
#pragma unroll
    for (int i = 0; i < kTile / 32; ++i) {
      const int64_t ch = tile * kTile + lane + 32 * i;
      w[q][i] = (row < R2 && ch < E) ? a.x_proj_weight[row * E + ch] : 0.f;
    }
  }
#pragma unroll
  for (int bb = 0; bb < kBatchGroup; ++bb) {
    if (bb >= nb) break;  // uniform across the block
    float xs[kTile / 32];
#pragma unroll
    for (int i = 0; i < kTile / 32; ++i) xs[i] = s_x[bb][lane + 32 * i];
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kTile / 32; ++i) acc += w[q][i] * xs[i];
      acc = group_sum(acc, 32);
      const int64_t row = row0 + warp * kRowsPerWarp + q;
      if (lane == 0 && row < R2) ws.partial[((b0 + bb) * T1 + tile) * R2 + row] = acc;
    }
  }
}

// dbc[b, row] = sum over tiles of partial[b, tile, row]. Grid: (row blocks, b).
__global__ void __launch_bounds__(128) reduce_xproj_kernel(DecodeStepArgs a) {
  const int64_t R2 = a.dt_rank + 2 * a.dstate, T1 = tiles(a.dim), b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 128 + threadIdx.x;
  if (row >= R2) return;
  const Workspace ws = split_workspace(a);
  float sum = 0.f;
  for (int64_t t = 0; t < T1; ++t) sum += ws.partial[(b * T1 + t) * R2 + row];
  ws.dbc[b * R2 + row] = sum;
}

template <typename T, int J>
__global__ void __launch_bounds__(kScanThreads) decode_scan_kernel(DecodeStepArgs a, int tpc) {
  extern __shared__ float smem[];
  const int64_t E = a.dim, N = a.dstate, R = a.dt_rank, R2 = R + 2 * N;
  const int cpb = kScanThreads / tpc;
  float* s_dbc = smem;  // [r + 2n]
  const int64_t b = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const Workspace ws = split_workspace(a);

  // Issue this thread's own loads first, so that their latency overlaps the dt phase.
  const int cl = threadIdx.x / tpc, sub = threadIdx.x % tpc;
  const int64_t e = c0 + cl;
  const bool active = e < E;
  float h[J], A[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    const bool ok = active && st < N;
    h[j] = ok ? a.ssm_state_in[(b * E + e) * N + st] : 0.f;
    A[j] = ok ? a.A[e * N + st] : 0.f;
  }
  const float x = active ? ws.xc[b * E + e] : 0.f;
  const float z = (active && sub == 0) ? to_float(static_cast<const T*>(a.xz)[b * 2 * E + E + e]) : 0.f;
  const float D = (active && sub == 0) ? a.D[e] : 0.f;

  for (int64_t row = threadIdx.x; row < R2; row += kScanThreads) s_dbc[row] = ws.dbc[b * R2 + row];
  __syncthreads();

  // dt: the channel's lane group splits the dt_proj dot product (lane `sub` takes k = sub, sub + tpc, ...).
  float dt_acc = 0.f;
  if (active) {
#pragma unroll 4
    for (int64_t k = sub; k < R; k += tpc) dt_acc += a.dt_proj_weight[e * R + k] * s_dbc[k];
  }
  dt_acc = group_sum(dt_acc, tpc);
  const float dt = active ? softplus(dt_acc + a.dt_bias[e]) : 0.f;
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    if (active && st < N) {
      h[j] = expf(dt * A[j]) * h[j] + dt * x * s_dbc[R + st];
      a.ssm_state_out[(b * E + e) * N + st] = h[j];
      acc += h[j] * s_dbc[R + N + st];
    }
  }
  acc = group_sum(acc, tpc);
  if (sub == 0 && active) static_cast<T*>(a.y)[b * E + e] = from_float<T>((acc + D * x) * silu(z));
}

template <typename T, int J>
cudaError_t launch(const DecodeStepArgs& a, cudaStream_t stream) {
  const int64_t R2 = a.dt_rank + 2 * a.dstate;
  const dim3 grid1(static_cast<unsigned>(tiles(a.dim)), ceil_div(a.batch, kBatchGroup), ceil_div(R2, kRows));
  conv_xproj_kernel<T><<<grid1, kTile, 0, stream>>>(a);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  reduce_xproj_kernel<<<dim3(ceil_div(R2, 128), static_cast<unsigned>(a.batch)), 128, 0, stream>>>(a);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const int tpc = next_pow2((a.dstate + J - 1) / J);
  const int cpb = kScanThreads / tpc;
  const size_t smem = R2 * sizeof(float);
  const dim3 grid3(ceil_div(a.dim, cpb), static_cast<unsigned>(a.batch));
  decode_scan_kernel<T, J><<<grid3, kScanThreads, smem, stream>>>(a, tpc);
  return cudaGetLastError();
}

}  // namespace

size_t decode_step_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank) {
  const int64_t R2 = dt_rank + 2 * dstate;
  return static_cast<size_t>(batch * dim + batch * tiles(dim) * R2 + batch * R2) * sizeof(float);
}

cudaError_t decode_step(const DecodeStepArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.dim < 0 || a.dstate < 1 || a.dstate > kMaxDState || a.width < 1 || a.width > kMaxDConv ||
      a.dt_rank < 1 || a.batch > 65535 || a.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  if (ceil_div(a.dt_rank + 2 * a.dstate, kRows) > 65535) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return a.dstate > 128 ? launch<T, 8>(a, stream) : launch<T, 4>(a, stream);
  });
}

}  // namespace mamba_cuda
