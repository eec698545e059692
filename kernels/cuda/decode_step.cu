// One decode step of a Mamba mixer between in_proj and out_proj, on float32 intermediates, in two phases:
//   1. conv + x_proj partials, per work item (tile of kTile channels, group of kRows x_proj rows, group of up to
//      kBatchGroup sequences): shift the conv state, conv + SiLU -> xc (the first row group writes xc and the new
//      conv state), then this tile's partial dot products of its rows with xc -> partial[b, tile, row]. Each weight
//      element is read once per batch group, with all of a warp's loads in flight together.
//   2. scan, per work item (block of channels, sequence): dbc = the x_proj output (the tiles' partial sums, added in
//      a fixed order: deterministic, no atomics), dt = softplus(dt_proj . dbc[:r] + dt_bias), state update with
//      B = dbc[r:r+n], C = dbc[r+n:], y = C.h + D x, gate silu(z).
// Three ways to run them, all with the same per-item code and the same summation order, so with identical bits:
//   fused     one cooperative kernel, one block per item of the larger phase (block i runs phase-1 item i and
//             phase-2 item i where they exist), a grid-wide barrier between the phases, phase 2 summing the partials
//             itself. Used at small batches, where the step is launch-bound and every item fits a resident block
//             (mamba-130m at batch 1 and 8).
//   split     one kernel per phase, phase 2 summing the partials itself (the redundant reads stay small).
//   unfolded  three kernels: phase 1, the partials' reduction once per sequence into dbc, phase 2 reading dbc. Used
//             where folding the reduction would read the partials many times over (large batch x channels).
// MAMBA_EXPORT_CUDA_DECODE=split or =unfolded forces a path (tests); the fused path also needs cooperative launches.
// Workspace (float32): xc [b, e], partial [b, tiles, r + 2n], dbc [b, r + 2n].
#include <cooperative_groups.h>

#include "common.cuh"
#include "mixer_scan.cuh"

namespace mamba_cuda {
namespace {

constexpr int kTile = 128;        // channels per phase-1 item (4 per lane of each warp); also the block size
constexpr int kWarps = kTile / 32;
constexpr int kRowsPerWarp = 4;   // x_proj rows per warp of phase 1, loaded together
constexpr int kRows = kWarps * kRowsPerWarp;
constexpr int kBatchGroup = 8;    // sequences per phase-1 item
constexpr int kThreads = kTile;   // threads per block of every kernel here

__host__ __device__ inline int64_t tiles(int64_t dim) { return (dim + kTile - 1) / kTile; }

struct Workspace {
  float* xc;
  float* partial;
  float* dbc;  // the reduced x_proj output [b, r + 2n], where the reduction is not folded into phase 2
};

__host__ __device__ inline Workspace split_workspace(const DecodeStepArgs& a) {
  Workspace w;
  w.xc = a.workspace;
  w.partial = w.xc + a.batch * a.dim;
  w.dbc = w.partial + a.batch * tiles(a.dim) * (a.dt_rank + 2 * a.dstate);
  return w;
}

// Phase-1 and phase-2 work items.
struct Items {
  int64_t tiles, batch_groups, row_groups;  // phase 1: tiles x batch groups x row groups
  int64_t chunks;                           // phase 2: batch x chunks, `cpb` channels per chunk
  int tpc, cpb;                             // threads per channel, channels per chunk
  bool fold;                                // phase 2 sums the partials itself (else it reads dbc)
  __host__ __device__ int64_t phase1() const { return tiles * batch_groups * row_groups; }
};

// Phase 1, one item: conv step + SiLU of kTile channels for up to kBatchGroup sequences, and the partial dot
// products of kRows x_proj rows with them. `s_x` is the block's [kBatchGroup][kTile] staging area; the caller
// separates consecutive items with __syncthreads().
template <typename T>
__device__ __forceinline__ void xproj_item(const DecodeStepArgs& a, const Workspace& ws, int64_t tile, int64_t b0,
                                           int64_t row0, bool writer, float (*s_x)[kTile]) {
  const int64_t E = a.dim, K = a.width, km1 = K - 1, R2 = a.dt_rank + 2 * a.dstate, T1 = tiles(E);
  const int nb = static_cast<int>(a.batch - b0 < kBatchGroup ? a.batch - b0 : kBatchGroup);
  const int64_t e = tile * kTile + threadIdx.x;
  const T* xz = static_cast<const T*>(a.xz);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // The weights first: they do not depend on the conv, so their loads overlap its latency.
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

template <typename T>
__device__ __forceinline__ void xproj_item(const DecodeStepArgs& a, const Workspace& ws, const Items& it, int64_t i,
                                           float (*s_x)[kTile]) {
  const int64_t tile = i % it.tiles, rest = i / it.tiles;
  const int64_t bg = rest % it.batch_groups, rg = rest / it.batch_groups;
  xproj_item<T>(a, ws, tile, bg * kBatchGroup, rg * kRows, rg == 0, s_x);
}

// Row `row` of sequence b's x_proj output: its tiles' partial sums, added in tile order (the same order wherever it
// runs, so every path gives the same bits).
__device__ __forceinline__ float reduce_row(const Workspace& ws, int64_t T1, int64_t R2, int64_t b, int64_t row) {
  const float* part = ws.partial + b * T1 * R2 + row;
  float sum = 0.f;
#pragma unroll 8
  for (int64_t t = 0; t < T1; ++t) sum += __ldcg(part + t * R2);
  return sum;
}

// Phase 2, one item: `cpb` channels of sequence b, `tpc` threads per channel (each holding J states), in two parts
// (mixer_scan.cuh): scan_loads issues the item's loads that do not depend on phase 1 (the fused kernel issues them
// before phase 1, so that their latency overlaps it and the barrier), scan_finish does the rest.
template <int J>
struct ScanLoads : MixerScanLoads<J> {
  float z, D, bias;
};

__device__ __forceinline__ ScanItem scan_item_of(const DecodeStepArgs& a, const Items& it, int64_t i) {
  return scan_item_of(a, it.chunks, it.cpb, it.tpc, i);
}

template <typename T, int J>
__device__ __forceinline__ void scan_loads(const DecodeStepArgs& a, const Items& it, int64_t i, ScanLoads<J>& L) {
  const int64_t E = a.dim;
  const ScanItem s = scan_item_of(a, it, i);
  const int64_t b = s.b, e = s.e;
  load_scan_state<J>(a, s, it.tpc, L);
  L.z = (s.active && s.sub == 0) ? to_float(static_cast<const T*>(a.xz)[b * 2 * E + E + e]) : 0.f;
  L.D = (s.active && s.sub == 0) ? a.D[e] : 0.f;
  L.bias = s.active ? a.dt_bias[e] : 0.f;
}

// Reads the phase-1 results with __ldcg (L2, not L1: in the fused kernel other blocks wrote them during this launch).
// `s_dbc` is the block's [r + 2n] area; the caller separates consecutive items with __syncthreads().
template <typename T, int J>
__device__ __forceinline__ void scan_finish(const DecodeStepArgs& a, const Workspace& ws, const Items& it, int64_t i,
                                            ScanLoads<J>& L, float* s_dbc) {
  const int64_t E = a.dim, N = a.dstate, R = a.dt_rank, R2 = R + 2 * N, T1 = tiles(E);
  const ScanItem s = scan_item_of(a, it, i);
  const int64_t b = s.b, e = s.e;
  const float x = s.active ? __ldcg(ws.xc + b * E + e) : 0.f;

  // dbc = the x_proj output of sequence b: the tiles' partial sums, added in tile order.
  if (it.fold) {
    for (int64_t row = threadIdx.x; row < R2; row += kThreads) s_dbc[row] = reduce_row(ws, T1, R2, b, row);
  } else {
    for (int64_t row = threadIdx.x; row < R2; row += kThreads) s_dbc[row] = __ldcg(ws.dbc + b * R2 + row);
  }
  __syncthreads();

  const float acc = scan_step<J>(a, s, it.tpc, L, L.bias, x, s_dbc);
  if (s.sub == 0 && s.active) static_cast<T*>(a.y)[b * E + e] = from_float<T>((acc + L.D * x) * silu(L.z));
}

template <typename T, int J>
__device__ __forceinline__ void scan_item(const DecodeStepArgs& a, const Workspace& ws, const Items& it, int64_t i,
                                          float* s_dbc) {
  ScanLoads<J> L;
  scan_loads<T, J>(a, it, i, L);
  scan_finish<T, J>(a, ws, it, i, L, s_dbc);
}

// Split path: one kernel per phase, one item per block.
template <typename T>
__global__ void __launch_bounds__(kThreads) xproj_kernel(DecodeStepArgs a, Items it) {
  __shared__ float s_x[kBatchGroup][kTile];
  xproj_item<T>(a, split_workspace(a), it, blockIdx.x, s_x);
}

// Unfolded split path: dbc[b, row] once per sequence. Grid: (row blocks, b).
__global__ void __launch_bounds__(kThreads) reduce_kernel(DecodeStepArgs a) {
  const int64_t R2 = a.dt_rank + 2 * a.dstate, b = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const Workspace ws = split_workspace(a);
  if (row < R2) ws.dbc[b * R2 + row] = reduce_row(ws, tiles(a.dim), R2, b, row);
}

template <typename T, int J>
__global__ void __launch_bounds__(kThreads) scan_kernel(DecodeStepArgs a, Items it) {
  extern __shared__ float s_dbc[];
  scan_item<T, J>(a, split_workspace(a), it, blockIdx.x, s_dbc);
}

// Fused path (cooperative launch with one block per item of the larger phase): block i runs phase-1 item i and
// phase-2 item i where they exist, with phase 2's own loads issued before phase 1 and a grid-wide barrier between.
template <typename T, int J>
__global__ void __launch_bounds__(kThreads) fused_kernel(DecodeStepArgs a, Items it) {
  __shared__ float s_x[kBatchGroup][kTile];
  extern __shared__ float s_dbc[];
  const Workspace ws = split_workspace(a);
  const int64_t i = blockIdx.x;
  const bool has2 = i < a.batch * it.chunks;
  ScanLoads<J> L;
  if (has2) scan_loads<T, J>(a, it, i, L);
  if (i < it.phase1()) xproj_item<T>(a, ws, it, i, s_x);
  cooperative_groups::this_grid().sync();
  if (has2) scan_finish<T, J>(a, ws, it, i, L, s_dbc);
}

// MAMBA_EXPORT_CUDA_DECODE = "split" or "unfolded" forces those paths (the tests compare every path); otherwise the
// fused kernel where it fits (below).
int forced_path() {
  const char* mode = std::getenv("MAMBA_EXPORT_CUDA_DECODE");
  if (mode == nullptr) return 0;
  if (std::strcmp(mode, "split") == 0) return 1;
  if (std::strcmp(mode, "unfolded") == 0) return 2;
  return 0;
}

bool cooperative_launch_supported() {
  int device = 0, coop = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) == cudaSuccess && coop != 0;
}

// Phase 2 sums the partials itself when the redundant reads that costs (every item of a sequence reads all its
// tiles' partials) stay small: up to 1M floats per step (mamba-130m at batch 8: 0.37M; mamba-1.4b at batch 64: 34M,
// where the separate reduction wins).
constexpr int64_t kMaxFoldedReads = int64_t{1} << 20;

template <typename T, int J>
cudaError_t launch(const DecodeStepArgs& a, cudaStream_t stream) {
  Items it{};
  it.tiles = tiles(a.dim);
  it.batch_groups = (a.batch + kBatchGroup - 1) / kBatchGroup;
  it.row_groups = (a.dt_rank + 2 * a.dstate + kRows - 1) / kRows;
  it.tpc = next_pow2((a.dstate + J - 1) / J);
  it.cpb = kThreads / it.tpc;
  it.chunks = (a.dim + it.cpb - 1) / it.cpb;
  const int64_t R2 = a.dt_rank + 2 * a.dstate, phase2 = a.batch * it.chunks;
  const size_t smem = R2 * sizeof(float);
  const int forced = forced_path();
  it.fold = forced == 1 || (forced != 2 && phase2 * it.tiles * R2 <= kMaxFoldedReads);
  // Fused: one cooperative kernel, when every item of both phases gets its own resident block. That is the
  // launch-bound regime (small batches); with more items than resident blocks, each block would run its items one
  // after another with few warps per SM to hide their latency, and separate launches do better.
  if (forced == 0 && it.fold && cooperative_launch_supported()) {
    const auto kernel = fused_kernel<T, J>;
    int per_sm = 0;
    if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
        err != cudaSuccess) {
      return err;
    }
    const int64_t resident = static_cast<int64_t>(per_sm) * sm_count();
    const int64_t want = it.phase1() > phase2 ? it.phase1() : phase2;
    if (want <= resident) {
      void* args[] = {const_cast<DecodeStepArgs*>(&a), &it};
      return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(want)),
                                         dim3(kThreads), args, smem, stream);
    }
  }
  if (it.phase1() > 0x7fffffff || phase2 > 0x7fffffff) return cudaErrorInvalidValue;
  xproj_kernel<T><<<static_cast<unsigned>(it.phase1()), kThreads, 0, stream>>>(a, it);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (!it.fold) {
    reduce_kernel<<<dim3(ceil_div(R2, kThreads), static_cast<unsigned>(a.batch)), kThreads, 0, stream>>>(a);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  scan_kernel<T, J><<<static_cast<unsigned>(phase2), kThreads, smem, stream>>>(a, it);
  return cudaGetLastError();
}

}  // namespace

size_t decode_step_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank) {
  const int64_t R2 = dt_rank + 2 * dstate;
  return static_cast<size_t>(batch * dim + batch * tiles(dim) * R2 + batch * R2) * sizeof(float);
}

cudaError_t decode_step(const DecodeStepArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.dim < 0 || a.dim > kMaxDim || a.dstate < 1 || a.dstate > kMaxDState ||
      a.width < 1 || a.width > kMaxDConv || a.dt_rank < 1 || a.dt_rank > kMaxDim || a.batch > 65535 ||
      a.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return a.dstate > 128 ? launch<T, 8>(a, stream) : launch<T, 4>(a, stream);
  });
}

}  // namespace mamba_cuda
