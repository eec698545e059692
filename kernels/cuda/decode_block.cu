// One whole decode layer of a Mamba model (the DecodeBlock op, mamba_cuda.h), in three phases of work items:
//   A. two per tile of kTileA channels and group of up to kGroup sequences, each computing the group's AddRMSNorm
//      (the x item of tile 0 writes residual_out) and kTileA in_proj rows against the normalised rows staged in
//      shared memory (one warp per kRowsA rows): the z item its tile's z rows -> z; the x item its x rows, the conv
//      step + SiLU of its channels, and the tile's partial x_proj sums -> partial[b, tile, row]. (Items of 16 channels'
//      x and z rows each, as before, left phase B twice the partials: chain benchmark, H100, 370m 15.3 -> 14.4 us a
//      layer, 1.4b 37.6 -> 35.5 with 32-channel items, and with the tagged exchange below 130m 11.68 -> 10.04.)
//   B. per block of channels and sequence: the x_proj output (its tiles' partials summed in a fixed order), dt_proj,
//      softplus, state update, output, gate -> y (rounded to T).
//   C. per kRowsC out_proj rows and group: the rows against y -> out (rounded to T).
// Every dot product over the model or channel dimension is one warp's (lane l takes the 16-byte vectors l, l + 32,
// ... of each kChunk-long chunk in order, then the warp's butterfly), every other sum has an order fixed by the
// sizes alone, and no result depends on which block or launch computes it. So the paths below give identical bits:
//   fused     one cooperative kernel, block i running item i of each phase (phase B then sums the partials itself).
//             Used when the batch fits one group and every item of every phase gets a resident block: the
//             launch-bound small-batch regime this op exists for. Between the phases, either a grid-wide barrier
//             (the partials, xc, z and y in the workspace), or by default the tagged exchange (below): each block
//             waits only for the words it reads.
//   split     one kernel per phase (phase B summing the partials itself).
//   unfolded  four kernels: A, the partials' sum once per sequence, B reading it, C. Used where folding the sum into
//             phase B would read the partials many times over (large batch x channels).
// Latency, not bandwidth, bounds it at batch 1: weights and phase-B state are requested before they are needed (in
// registers, cp.async into shared memory, or an L2 bulk prefetch), and batch 1 has its own build (NB = 1). The matrix
// products are SIMT loops: at batch 8 and above onnxruntime's cuBLAS MatMul nodes are faster (docs/gpu.md).
// MAMBA_EXPORT_CUDA_DECODE_BLOCK=split or =unfolded forces a path, MAMBA_EXPORT_CUDA_TAGGED=0 the fused kernel's
// barriers (tests).
// Early start: with constant weights (DecodeBlockArgs::constant_weights) on sm_90+, the fused batch-1 kernel is
// launched with programmatic dependent launch. A block first issues its constant weights' loads (in_proj rows into
// registers, conv and x_proj weights into shared memory, the norm weight), then waits (pdl_wait) for the previous
// kernel, typically the previous layer's DecodeBlock, and only then reads x, residual and the states or writes
// anything. So a layer's weight loads overlap the previous layer's phases B and C, and the launch gap goes. Measured
// on the H100 (docs/gpu.md) it pays only there: the batch-8 fused kernel (one block an SM, no room for the next
// layer's) and the split kernels (phase C never lets the next layer in early) were 1-7% slower with it, so they run
// without it.
// Workspace (float32, each part 16-byte aligned): xc [b, e], z [b, e], partial [b, tiles, r + 2n rounded up to 4],
// dbc [b, r + 2n], y [b, e].
#include <cooperative_groups.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "mixer_scan.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                            // sequences per group (phases A and C)
constexpr int kTileA = 32;                           // channels per phase-A item
constexpr int kRowsA = kTileA / kWarps;              // in_proj rows per warp (the item's x rows, or its z rows)
constexpr int kRowsC = kWarps;                       // out_proj rows per phase-C item, one per warp
constexpr int kNVA = 4;                              // in_proj vectors per lane and row in one pass
constexpr int kXW = 128;                             // x_proj rows of a tile staged in shared memory
constexpr int kChunk = 2048;                         // activation values per row staged in shared memory at a time
constexpr int64_t kMaxFoldedReads = int64_t{4} << 20;  // partials phase B may read in all when it sums them itself

__host__ __device__ inline int64_t pad4(int64_t n) { return (n + 3) / 4 * 4; }
__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Plan {
  // Counts in int (decode_block() bounds the sizes), so that the kernels split block indices by 32-bit division.
  int tiles;                 // phase A: tiles of kTileA channels (two items each: its z rows, its x rows)
  int groups;                // batch groups of kGroup
  int rows_c;                // phase C: groups of kRowsC out_proj rows
  int chunks_b;              // phase B: channel blocks of cpb channels, tpc threads per channel
  int tpc, cpb;              // phase B: threads per channel, channels per block
  int nb_max;                // rows of shared activations: min(batch, kGroup)
  bool fold;                 // phase B sums the partials itself (else it reads dbc)
  bool pdl;                  // launched to start before the previous kernel has finished (phase A's load order)
  unsigned* barrier;         // the fused kernel's grid-barrier word (nullptr: cooperative groups' barrier)
  unsigned long long* xbuf;  // the fused kernel's tagged exchange (see below; nullptr: workspace and grid barriers)
  __host__ __device__ int64_t items_a() const { return int64_t{2} * tiles * groups; }
  __host__ __device__ int64_t items_c() const { return static_cast<int64_t>(rows_c) * groups; }
};

struct Workspace {
  float *xc, *z, *partial, *dbc, *y;
};

__host__ __device__ inline int64_t r2_of(const DecodeBlockArgs& a) { return a.dt_rank + 2 * a.dstate; }

__host__ __device__ inline Workspace split_workspace(const DecodeBlockArgs& a, int64_t tiles) {
  const int64_t b = a.batch, e = a.dim, r2 = r2_of(a);
  Workspace w;
  w.xc = a.workspace;
  w.z = w.xc + pad4(b * e);
  w.partial = w.z + pad4(b * e);
  w.dbc = w.partial + b * tiles * pad4(r2);
  w.y = w.dbc + pad4(b * r2);
  return w;
}

// Shared memory of every kernel: the fixed part, then (dynamic) the staged activations [nb_max][kChunk] and dbc.
struct Shared {
  float sq[kWarps][kGroup];          // the warps' sums of squares of the group's rows
  float scale[kGroup];               // 1 / rms of the group's rows
  float xz[kTileA][kGroup];          // the item's in_proj outputs (rounded to T): its x rows or its z rows
  float xc[kGroup][kTileA];          // conv + SiLU of the tile's channels
  // The tile's x_proj weights (rows beyond kXW are read from global memory), each row padded by 4 floats so that the
  // 16-byte reads of rows t, t + 1, ... by consecutive threads fall on different banks.
  alignas(16) float xw[kXW][kTileA + 4];
  float cst[kGroup][kTileA][kMaxDConv - 1];  // the tile's conv states
  float cw[kTileA][kMaxDConv];       // and conv weights
  float cb[kTileA];                  // and conv biases
  unsigned tag;                      // the launch's tag (tagged exchange)
};

// ---- timeline (tools/decode_block_chain.cu) ---------------------------------------------------------------------
// Built with -DMAMBA_CUDA_TIMELINE, thread 0 of each block writes %globaltimer at the fused kernel's phase boundaries
// into the 16-byte-aligned space past the workspace (the chain benchmark allocates it): 16 words a block.
#ifdef MAMBA_CUDA_TIMELINE
__device__ __forceinline__ void stamp(const DecodeBlockArgs& a, int k) {
  if (threadIdx.x != 0) return;
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  const Workspace w = split_workspace(a, (a.dim + kTileA - 1) / kTileA);
  reinterpret_cast<uint64_t*>(a.workspace + pad4(w.y + a.batch * a.dim - a.workspace))[blockIdx.x * 16 + k] = t;
}
#else
__device__ __forceinline__ void stamp(const DecodeBlockArgs&, int) {}
#endif

// ---- the fused kernel's grid-wide barrier ---------------------------------------------------------------------------
// Cooperative groups' algorithm: thread 0 of each block adds to one word, block 0 adds 2^31 - (blocks - 1) and the
// others 1, so a barrier flips the word's top bit and leaves its low 31 bits as they were (zero); the block waits
// until the top bit differs from what its own add returned. Here the add is a release and the wait an acquire, after
// and before __syncthreads() (as CUTLASS's barriers), where cooperative groups issues two full fences (fence.sc):
// 12.10 -> 11.75 us a 130m layer (chain benchmark, H100, MAMBA_EXPORT_CUDA_CG_BARRIER=1 against the default). The
// word's low bits must be zero, and one launch at a time may use it: barrier_word() gives each (device, stream) its
// own word of g_barrier_words (zero when the module loads; every complete barrier leaves it so). A kernel on the
// stream after this one passes pdl_wait(), and so waits for this one to finish, before its first barrier. With no
// word (nullptr), cooperative groups' barrier.
constexpr int kBarrierWords = 1024;
__device__ unsigned g_barrier_words[kBarrierWords];

__device__ __forceinline__ void grid_barrier(unsigned* word) {
  if (word == nullptr) {
    cooperative_groups::this_grid().sync();
    return;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    unsigned old, now;
    asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;" : "=r"(old) : "l"(word), "r"(add) : "memory");
    do {
      asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(word) : "memory");
    } while (((now ^ old) & 0x80000000u) == 0);
  }
  __syncthreads();
}

// ---- loads -------------------------------------------------------------------------------------------------------
template <int V>
__device__ __forceinline__ void load_act(const float* p, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + j);
      out[j] = v.x, out[j + 1] = v.y, out[j + 2] = v.z, out[j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = p[j];
  }
}

// Asks the L2 cache to fetch [p, p + bytes) ahead of its use (sm_90 bulk prefetch; skipped where unaligned).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (bytes <= 0 || bytes >= (int64_t{1} << 31) || addr % 16 != 0 || bytes % 16 != 0) return;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr), "r"(static_cast<unsigned>(bytes)) : "memory");
#endif
}

// Asynchronous 4-byte copy global -> shared (cp.async, sm_80+): no register waits for it; cp_async_wait() then a
// __syncthreads() make every thread's copies visible.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// 16-byte copy that bypasses L1 (.cg): for data other blocks of this launch, or the previous kernel, wrote.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
// Closes the group of this thread's cp.async copies issued so far; cp_async_wait_prior<N>() waits for all groups but
// the N most recent.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_prior() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ---- the warp dot product ----------------------------------------------------------------------------------------
// acc[q][bb] += W[row q][k] * act[bb][k - k0] over a chunk [k0, k0 + kc): lane l takes the V-vectors l, l + 32, ... of
// the chunk in order. The weights travel in passes of NV vectors per lane and row, each pass's loads issued together
// (load_pass) before its products (fma_pass); the order of the sums does not depend on NV.
template <typename T, int V>
using Raw = std::conditional_t<V == 1, T, uint4>;

template <typename T, int V>
__device__ __forceinline__ void unpack(const Raw<T, V>& raw, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(raw);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(e[j]);
  }
}

template <typename T, int V, int Q, int NV>
struct Pass {
  Raw<T, V> w[Q][NV];
  static constexpr int kLen = 32 * V * NV;  // chunk elements per pass
};

// Loads pass `k` (chunk-relative start) of the rows: lane l takes vectors l, l + 32, ... (NV of them).
template <typename T, int V, int Q, int NV>
__device__ __forceinline__ void load_pass(const T* const (&wrow)[Q], const bool (&valid)[Q], int64_t k0, int k, int kc,
                                          Pass<T, V, Q, NV>& P) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int kk = k + (lane + 32 * i) * V;
      P.w[q][i] = (valid[q] && kk < kc) ? *reinterpret_cast<const Raw<T, V>*>(wrow[q] + k0 + kk) : Raw<T, V>{};
    }
  }
}

template <typename T, int V, int Q, int NV, int NB>
__device__ __forceinline__ void fma_pass(const Pass<T, V, Q, NV>& P, int k, int kc, const float* act, int nb,
                                         float (&acc)[Q][NB]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int kk = k + (lane + 32 * i) * V;
    if (kk >= kc) break;
    float w[Q][V];
#pragma unroll
    for (int q = 0; q < Q; ++q) unpack<T, V>(P.w[q][i], w[q]);
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
      if (bb >= nb) break;  // uniform across the warp
      float x[V];
      load_act<V>(act + bb * kChunk + kk, x);
#pragma unroll
      for (int q = 0; q < Q; ++q) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[q][bb] += w[q][j] * x[j];
      }
    }
  }
}

// The rest of a chunk after its first pass (already loaded into P and not yet multiplied).
template <typename T, int V, int Q, int NV, int NB>
__device__ __forceinline__ void dot_chunk(const T* const (&wrow)[Q], const bool (&valid)[Q], int64_t k0, int kc,
                                          const float* act, int nb, Pass<T, V, Q, NV>& P, float (&acc)[Q][NB]) {
  constexpr int L = Pass<T, V, Q, NV>::kLen;
  fma_pass<T, V, Q, NV, NB>(P, 0, kc, act, nb, acc);
  for (int k = L; k < kc; k += L) {
    load_pass<T, V, Q, NV>(wrow, valid, k0, k, kc, P);
    fma_pass<T, V, Q, NV, NB>(P, k, kc, act, nb, acc);
  }
}

// Copies n floats (n a multiple of 4, both 16-byte aligned) with all of a thread's loads issued together.
__device__ __forceinline__ void stage(float* dst, const float* src, int n) {
  const float4* s4 = reinterpret_cast<const float4*>(src);
  float4* d4 = reinterpret_cast<float4*>(dst);
  const int n4 = n / 4;
  for (int i0 = threadIdx.x; i0 < n4; i0 += 4 * kThreads) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * kThreads;
      if (i < n4) v[u] = __ldcg(s4 + i);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * kThreads;
      if (i < n4) d4[i] = v[u];
    }
  }
}

// ---- the fused kernel's tagged exchange -----------------------------------------------------------------------------
// Instead of the workspace and grid-wide barriers, the fused kernel can pass xc, z, the x_proj partials and y from
// block to block as tagged words: the float's bits in the low half of a 64-bit word, the launch's tag in the high half,
// written and read as single 64-bit relaxed (gpu-scope) accesses, so that a word read with this launch's tag holds
// this launch's value. A reader loads the words it needs and loads again those not yet tagged: one L2 round trip
// after the last writer where a barrier took two and then the copy a third. The words live in a buffer owned by the
// library (exchange_buffer()), one per (device, stream, grid, sizes), zeroed when allocated: every launch on it writes
// every word (used only where r2 is a multiple of 4, so that the partials have no padding), so a stale word carries
// the previous launch's tag. The tag: word 0 counts the blocks that have finished over all launches on the buffer
// (each adds 1 as it ends); a block reads it once the previous kernel has finished (pdl_wait) and takes
// count / grid + 1 (blocks of this launch that ended before the read add less than a grid).
struct Tagged {
  unsigned long long *count, *partial, *xc, *z, *y;
};

__host__ __device__ inline Tagged tagged_words(unsigned long long* base, const DecodeBlockArgs& a, int64_t tiles) {
  const int64_t b = a.batch, e = a.dim;
  Tagged t;
  t.count = base;
  t.partial = base + 2;
  t.xc = t.partial + b * tiles * pad4(r2_of(a));
  t.z = t.xc + b * e;
  t.y = t.z + b * e;
  return t;
}
__host__ inline int64_t tagged_words_count(const DecodeBlockArgs& a, int64_t tiles) {
  return 2 + a.batch * tiles * pad4(r2_of(a)) + 3 * a.batch * a.dim;
}

__device__ __forceinline__ void put_tagged(unsigned long long* p, float v, unsigned tag) {
  const unsigned long long w = static_cast<unsigned long long>(tag) << 32 | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(w));
}
__device__ __forceinline__ unsigned long long get_tagged(const unsigned long long* p) {
  unsigned long long w;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(w) : "l"(p));
  return w;
}
__device__ __forceinline__ bool has_tag(unsigned long long w, unsigned tag) {
  return static_cast<unsigned>(w >> 32) == tag;
}
// A wait longer than kMaxPolls loads (seconds) means a word nobody writes: a bug, reported as a kernel error (trap)
// rather than a hang.
constexpr unsigned kMaxPolls = 1u << 26;

// One tagged word's float, loaded until it carries `tag`.
__device__ __forceinline__ float wait_tagged(const unsigned long long* p, unsigned tag) {
  unsigned long long w = get_tagged(p);
  for (unsigned polls = 1; !has_tag(w, tag); ++polls) {
    if (polls > kMaxPolls) __trap();
    w = get_tagged(p);
  }
  return __uint_as_float(static_cast<unsigned>(w));
}

// dst[i] = the float of src[i] for i < n once it carries `tag`: thread t takes i = t, t + kThreads, ... in passes of
// kPoll words, a pass's loads issued together, then those not yet tagged loaded again (together).
constexpr int kPoll = 16;
__device__ __forceinline__ void gather_tagged(float* dst, const unsigned long long* src, int n, unsigned tag) {
  for (int i0 = threadIdx.x; i0 < n; i0 += kPoll * kThreads) {
    unsigned long long w[kPoll];
    unsigned pending = 0;
#pragma unroll
    for (int k = 0; k < kPoll; ++k) {
      if (i0 + k * kThreads < n) pending |= 1u << k;
    }
    for (unsigned polls = 0; pending != 0; ++polls) {
      if (polls > kMaxPolls) __trap();
#pragma unroll
      for (int k = 0; k < kPoll; ++k) {
        if (pending >> k & 1u) w[k] = get_tagged(src + i0 + k * kThreads);
      }
#pragma unroll
      for (int k = 0; k < kPoll; ++k) {
        if ((pending >> k & 1u) && has_tag(w[k], tag)) {
          dst[i0 + k * kThreads] = __uint_as_float(static_cast<unsigned>(w[k]));
          pending &= ~(1u << k);
        }
      }
    }
  }
}

// The launch's tag (thread 0; see above).
__device__ __forceinline__ unsigned launch_tag(const unsigned long long* count) {
  unsigned long long c;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(c) : "l"(count) : "memory");
  return static_cast<unsigned>(c / gridDim.x) + 1u;
}


// The norms' scales 1 / rms of nb rows of d values from each thread's sum of squares: its warp's butterfly, then the
// warps in order (DecodeBlock's phase A and DecodeHead, so that both give the same bits). s_sq and scale are shared.
template <int NB>
__device__ __forceinline__ void block_scales(const float (&sq)[NB], int nb, int64_t d, float epsilon,
                                             float (*s_sq)[kGroup], float* scale) {
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) {
    const float v = group_sum(sq[bb], 32);
    if (threadIdx.x % 32 == 0) s_sq[threadIdx.x / 32][bb] = v;
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_sq[w][threadIdx.x];
    scale[threadIdx.x] = 1.f / sqrtf(total / static_cast<float>(d) + epsilon);
  }
  __syncthreads();
}

// ---- phase A -----------------------------------------------------------------------------------------------------
template <typename T, typename R, int V, int NB, int NV, bool X = false>
__device__ __forceinline__ void phase_a(const DecodeBlockArgs& a, const Plan& p, const Workspace& ws, int item,
                                        Shared& sh, float* act, void* rows_smem) {
  constexpr int Q = kRowsA;
  constexpr int kG = kChunk / kThreads;  // norm weights per thread kept in registers (staged rows)
  const int64_t E = a.dim, K = a.width, km1 = K - 1, R2 = r2_of(a);
  const int Dm = static_cast<int>(a.dmodel);
  const int tile = item % p.tiles;
  // The item's in_proj rows: its tile's z rows (the first p.tiles items of a group), else its x rows. The z items
  // finish phase A first, and at batch 1 the fused kernel's blocks with a phase-B item are the first blocks: z items.
  const bool zrows = (item / p.tiles) % 2 == 0;
  const int64_t b0 = static_cast<int64_t>(item / (2 * p.tiles)) * kGroup, e0 = static_cast<int64_t>(tile) * kTileA;
  const int nb = static_cast<int>(a.batch - b0 < NB ? a.batch - b0 : NB);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xin = static_cast<const T*>(a.x) + b0 * Dm;
  const int rs = a.residual_broadcast ? 0 : Dm;  // the residual's row stride
  const R* res = static_cast<const R*>(a.residual) + b0 * rs;
  R* rout = static_cast<R*>(a.residual_out) + b0 * Dm;
  const T* nw = static_cast<const T*>(a.norm_weight);

  // in_proj: warp w takes the tile's channels c = w * Q + q: x row e0 + c, or z row E + e0 + c.
  const T* W = static_cast<const T*>(a.in_proj_weight);
  const T* wrow[Q];
  bool valid[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int c = warp * Q + q;
    valid[q] = e0 + c < E;
    wrow[q] = W + ((zrows ? E : 0) + e0 + c) * Dm;
  }
  // The weights (constant) and the previous kernel's outputs (x, residual) are loaded in one of two orders. Launched
  // early (p.pdl): the weights first, all of them before pdl_wait(), so that they arrive while the previous kernel
  // finishes. Otherwise, at batch 1, the row's residual and x first, so that the norm does not wait behind the weights.
  const bool staged = Dm <= kChunk;
  // At batch 1 the row's residual and x come into shared memory by cp.async where the caller gives room (the fused
  // kernel: launch()'s rows_bytes) and both are 16-byte aligned: register loads here were issued one element after
  // another under the register bound, each an L2 round trip. Otherwise into r1 by register loads.
  R* res_s = static_cast<R*>(rows_smem);
  T* x_s = reinterpret_cast<T*>(res_s + Dm);
  const bool rows_async = NB == 1 && staged && rows_smem != nullptr && Dm % 8 == 0 && aligned16(res) &&
                          aligned16(xin);
  float r1[kG];
  const auto load_rows = [&] {
    if constexpr (NB == 1) {
      if (rows_async) {
        constexpr int kR = static_cast<int>(16 / sizeof(R)), kT = static_cast<int>(16 / sizeof(T));
        for (int i = threadIdx.x; i < Dm / kR; i += kThreads) cp_async16(res_s + i * kR, res + i * kR);
        for (int i = threadIdx.x; i < Dm / kT; i += kThreads) cp_async16(x_s + i * kT, xin + i * kT);
        cp_async_commit();
        return;
      }
#pragma unroll
      for (int i = 0; i < kG; ++i) {
        const int k = threadIdx.x + i * kThreads;
        r1[i] = staged && k < Dm ? to_float(res[k]) + to_float(xin[k]) : 0.f;
      }
    }
  };
  if (!p.pdl) load_rows();
  const int kc0 = Dm < kChunk ? Dm : kChunk;
  Pass<T, V, Q, NV> P;
  load_pass<T, V, Q, NV>(wrow, valid, 0, 0, kc0, P);  // in flight during the norm

  // An x item's other inputs that do not depend on the norm, copied into shared memory meanwhile: the tile's x_proj
  // weights, conv weights and biases (constant), then, once the previous kernel has finished, its conv states.
  const int cbb = threadIdx.x / kTileA, cc = threadIdx.x % kTileA;
  const bool conv_thread = cbb < nb && e0 + cc < E;
  const int ch = zrows ? 0 : static_cast<int>(E - e0 < kTileA ? E - e0 : kTileA);
  {
    const int kk = static_cast<int>(K), xrows = static_cast<int>(R2 < kXW ? R2 : kXW);
    const float* xw = a.x_proj_weight + e0;
    if (ch == kTileA && E % 4 == 0 && aligned16(xw)) {
      constexpr int kQ = kTileA / 4;
      for (int i = threadIdx.x; i < xrows * kQ; i += kThreads) {
        cp_async16(&sh.xw[i / kQ][i % kQ * 4], xw + (i / kQ) * E + i % kQ * 4);
      }
    } else {
      for (int i = threadIdx.x; i < xrows * kTileA; i += kThreads) {
        const int row = i / kTileA, c = i % kTileA;
        if (c < ch) cp_async4(&sh.xw[row][c], xw + row * E + c);
      }
    }
    for (int i = threadIdx.x; i < ch * kk; i += kThreads) cp_async4(&sh.cw[i / kk][i % kk], a.conv_weight + e0 * K + i);
    if (threadIdx.x < ch) cp_async4(&sh.cb[threadIdx.x], a.conv_bias + e0 + threadIdx.x);
  }
  float g[kG];
#pragma unroll
  for (int i = 0; i < kG; ++i) {
    const int k = threadIdx.x + i * kThreads;
    g[i] = staged && k < Dm ? to_float(nw[k]) : 0.f;
  }

  pdl_wait();
  pdl_trigger();
  stamp(a, 1);
  if (p.pdl) load_rows();
  {
    const int k1 = static_cast<int>(km1);
    for (int i = threadIdx.x; i < nb * kTileA * k1; i += kThreads) {
      const int bb = i / (kTileA * k1), c = (i / k1) % kTileA, j = i % k1;
      if (c < ch) cp_async4(&sh.cst[bb][c][j], a.conv_state_in + ((b0 + bb) * E + e0 + c) * km1 + j);
    }
  }
  if constexpr (X) {
    if (threadIdx.x == 0) sh.tag = launch_tag(p.xbuf);  // after the copies above are issued
  }

  // The norm: r = R(residual + x); thread t sums r^2 over k = t, t + kThreads, ... in order, then its warp's
  // butterfly, then the warps in order. Rows that fit a chunk keep r in `act` (scaled in place below).
  if (rows_async) {
    cp_async_commit();
    cp_async_wait_prior<1>();  // the rows (and the constant weights before them), not the conv states just issued
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kG; ++i) {
      const int k = threadIdx.x + i * kThreads;
      r1[i] = k < Dm ? to_float(res_s[k]) + to_float(x_s[k]) : 0.f;
    }
  }
  float sq[NB];
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) {
    sq[bb] = 0.f;
    if (bb >= nb) continue;
    if (NB == 1 && staged) {
#pragma unroll
      for (int i = 0; i < kG; ++i) {
        const int k = threadIdx.x + i * kThreads;
        if (k < Dm) {
          const R rounded = from_float<R>(r1[i]);
          const float v = to_float(rounded);
          if (tile == 0 && !zrows) rout[k] = rounded;
          act[k] = v;
          sq[0] += v * v;
        }
      }
      continue;
    }
    for (int k0 = threadIdx.x; k0 < Dm; k0 += 4 * kThreads) {
      float r[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int k = k0 + u * kThreads;
        r[u] = k < Dm ? to_float(res[bb * rs + k]) + to_float(xin[bb * Dm + k]) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int k = k0 + u * kThreads;
        if (k < Dm) {
          const R rounded = from_float<R>(r[u]);
          const float v = to_float(rounded);
          if (tile == 0 && !zrows) rout[bb * Dm + k] = rounded;
          if (staged) act[bb * kChunk + k] = v;
          sq[bb] += v * v;
        }
      }
    }
  }
  block_scales<NB>(sq, nb, Dm, a.epsilon, sh.sq, sh.scale);
  stamp(a, 2);

  float acc[Q][NB];
#pragma unroll
  for (int q = 0; q < Q; ++q)
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) acc[q][bb] = 0.f;
  for (int k0 = 0; k0 < Dm; k0 += kChunk) {
    const int kc = Dm - k0 < kChunk ? Dm - k0 : kChunk;
    if (staged) {
#pragma unroll
      for (int bb = 0; bb < NB; ++bb) {
        if (bb >= nb) break;
        const float scale = sh.scale[bb];
#pragma unroll
        for (int i = 0; i < kG; ++i) {
          const int k = threadIdx.x + i * kThreads;
          if (k < Dm) act[bb * kChunk + k] = to_float(from_float<T>(act[bb * kChunk + k] * scale * g[i]));
        }
      }
    } else {
      load_pass<T, V, Q, NV>(wrow, valid, k0, 0, kc, P);
      for (int i = threadIdx.x; i < nb * kc; i += kThreads) {
        const int bb = i / kc, k = k0 + i % kc;
        const float r = to_float(from_float<R>(to_float(res[bb * rs + k]) + to_float(xin[bb * Dm + k])));
        act[bb * kChunk + k - k0] = to_float(from_float<T>(r * sh.scale[bb] * to_float(nw[k])));
      }
    }
    __syncthreads();
    dot_chunk<T, V, Q, NV, NB>(wrow, valid, k0, kc, act, nb, P, acc);
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < Q; ++q) {
#pragma unroll
    for (int bb = 0; bb < NB; ++bb) {
      const float v = group_sum(acc[q][bb], 32);
      if (lane == 0) sh.xz[warp * Q + q][bb] = to_float(from_float<T>(v));
    }
  }
  stamp(a, 3);
  cp_async_wait();
  __syncthreads();
  const Tagged tw = tagged_words(p.xbuf, a, p.tiles);
  if (zrows) {
    if (threadIdx.x < NB * kTileA && conv_thread) {
      const int64_t i = (b0 + cbb) * E + e0 + cc;
      if constexpr (X) {
        put_tagged(tw.z + i, sh.xz[cc][cbb], sh.tag);
      } else {
        ws.z[i] = sh.xz[cc][cbb];
      }
    }
    return;
  }

  // conv step + SiLU of the tile's channels (the order of DecodeStep's: bias, newest input, then the state).
  if (threadIdx.x < NB * kTileA) {
    float xc = 0.f;
    if (conv_thread) {
      const int64_t e = e0 + cc, b = b0 + cbb;
      const float* st = sh.cst[cbb][cc];
      const float* cw = sh.cw[cc];
      const float xnew = sh.xz[cc][cbb];
      float v = sh.cb[cc] + cw[km1] * xnew;
      for (int64_t j = 0; j < km1; ++j) v += cw[j] * st[j];
      xc = silu(v);
      float* st_out = a.conv_state_out + (b * E + e) * km1;
      for (int64_t j = 0; j + 1 < km1; ++j) st_out[j] = st[j + 1];
      if (km1 > 0) st_out[km1 - 1] = xnew;
      if constexpr (X) {
        put_tagged(tw.xc + b * E + e, xc, sh.tag);
      } else {
        ws.xc[b * E + e] = xc;
      }
    }
    sh.xc[cbb][cc] = xc;
  }
  __syncthreads();
  stamp(a, 4);

  // The tile's partial x_proj sums (channels in order), thread `row` for every sequence of the group. The rows'
  // padding up to pad4(r2) gets zeros: phase B sums it (16-byte copies) into dbc rows it drops, and a read of memory
  // never written is what compute-sanitizer's initcheck reports. The tagged exchange, whose readers wait for every
  // word, runs only where r2 is a multiple of 4: no padding.
  if constexpr (!X) {
    const int64_t pad = pad4(R2) - R2;
    for (int k = threadIdx.x; k < nb * pad; k += kThreads) {
      ws.partial[((b0 + k / pad) * p.tiles + tile) * pad4(R2) + R2 + k % pad] = 0.f;
    }
  }
  const bool full_tile = e0 + kTileA <= E;
  for (int row = threadIdx.x; row < R2; row += kThreads) {
    float wx[kTileA];
    if (full_tile && row < kXW) {  // the common case, without a test per channel
#pragma unroll
      for (int c = 0; c < kTileA; c += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&sh.xw[row][c]);
        wx[c] = v.x, wx[c + 1] = v.y, wx[c + 2] = v.z, wx[c + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int c = 0; c < kTileA; ++c) {
        wx[c] = e0 + c >= E ? 0.f : row < kXW ? sh.xw[row][c] : a.x_proj_weight[row * E + e0 + c];
      }
    }
    for (int bb = 0; bb < nb; ++bb) {
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < kTileA; ++c) s += wx[c] * sh.xc[bb][c];
      const int64_t i = ((b0 + bb) * p.tiles + tile) * pad4(R2) + row;
      if constexpr (X) {
        put_tagged(tw.partial + i, s, sh.tag);
      } else {
        ws.partial[i] = s;
      }
    }
  }
}

// ---- phase B -----------------------------------------------------------------------------------------------------
// dbc[row] of sequence b = the sum of its tiles' partials ([tiles][r2 rounded up to 4] per sequence, contiguous):
// thread t takes the row quad t % quads of the tiles g, g + G, ... (g = t / quads, G = kThreads / quads groups),
// summing them in tile order; then thread `row` adds the groups' sums in group order. The partials travel into shared
// memory by cp.async (16-byte copies, none of them through registers, all of a round in flight together), at most
// stage_tiles(...) tiles a round: register loads here were issued a few at a time where the fused kernel's other
// loads held the registers (0.4 us an L2 round trip each, 3.3 us a layer on the H100). `s_dbc` holds
// dbc_floats(...) floats: dbc [pad4(r2)], the groups' sums [4 kThreads], the staged partials.
constexpr int64_t kStageFloats = 12288;  // staged partials (48 KiB): mamba-130m's and 370m's 96-128 tiles in one round

__host__ __device__ inline int64_t stage_tiles(const Plan& p, int64_t R2) {
  const int64_t fit = kStageFloats / pad4(R2);
  return p.tiles < fit ? p.tiles : (fit < 1 ? 1 : fit);
}
__host__ __device__ inline int64_t dbc_floats(const Plan& p, int64_t R2) {
  return pad4(R2) + 4 * kThreads + stage_tiles(p, R2) * pad4(R2);
}

// Copies the partials of tiles [t0, t0 + n) of sequence b into the staging area (cp.async, not waited for).
__device__ __forceinline__ void issue_partials(const Workspace& ws, const Plan& p, int64_t R2, int64_t b, float* s_dbc,
                                               int t0, int n) {
  const int quads = static_cast<int>(pad4(R2) / 4);
  float4* staged = reinterpret_cast<float4*>(s_dbc + pad4(R2) + 4 * kThreads);
  const float4* from = reinterpret_cast<const float4*>(ws.partial + b * p.tiles * pad4(R2)) +
                       static_cast<int64_t>(t0) * quads;
  for (int i = threadIdx.x; i < n * quads; i += kThreads) cp_async16(staged + i, from + i);
}

// Whether the partials come in one round (all tiles staged together, at most kThreads quads): then the fused kernel
// issues that round's copies itself (issue_partials) before its other loads, and reduce_dbc is told so.
__host__ __device__ inline bool one_round(const Plan& p, int64_t R2) {
  return pad4(R2) / 4 <= kThreads && stage_tiles(p, R2) >= p.tiles;
}

template <bool X = false>
__device__ __forceinline__ void reduce_dbc(const DecodeBlockArgs& a, const Workspace& ws, const Plan& p, int64_t R2,
                                           int64_t b, float* s_dbc, bool issued = false, unsigned tag = 0) {
  const int quads = static_cast<int>(pad4(R2) / 4);
  const int round_tiles = static_cast<int>(stage_tiles(p, R2));
  float* parts = s_dbc + pad4(R2);
  float4* staged = reinterpret_cast<float4*>(parts + 4 * kThreads);
  for (int q0 = 0; q0 < quads; q0 += kThreads) {  // more than kThreads quads: rounds of kThreads (one group)
    const int nq = quads - q0 < kThreads ? quads - q0 : kThreads;
    const int t = static_cast<int>(threadIdx.x);
    const int groups = kThreads / nq, q = q0 + t % nq, g = t / nq;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int t0 = 0; t0 < p.tiles; t0 += round_tiles) {
      const int n = p.tiles - t0 < round_tiles ? p.tiles - t0 : round_tiles;
      if constexpr (X) {
        gather_tagged(reinterpret_cast<float*>(staged),
                      tagged_words(p.xbuf, a, p.tiles).partial + (b * p.tiles + t0) * pad4(R2),
                      n * 4 * quads, tag);
      } else {
        if (!(issued && q0 == 0 && t0 == 0)) issue_partials(ws, p, R2, b, s_dbc, t0, n);
      }
      cp_async_wait();
      __syncthreads();
      if (t0 == 0) stamp(a, 11);
      if (g < groups) {
        // This thread's first tile of the round: the least t >= t0 with t = g (mod groups).
        const int first = t0 == 0 ? g : t0 + (g - t0 % groups + groups) % groups;
        for (int t = first; t < t0 + n; t += groups) {
          const float4 v = staged[(t - t0) * quads + q];
          s.x += v.x;
          s.y += v.y;
          s.z += v.z;
          s.w += v.w;
        }
      }
      __syncthreads();
    }
    if (g < groups) reinterpret_cast<float4*>(parts)[g * nq + (q - q0)] = s;
    __syncthreads();
    for (int r = threadIdx.x; r < 4 * nq; r += kThreads) {
      const int row = 4 * q0 + r;
      float sum = 0.f;
      for (int gg = 0; gg < groups; ++gg) sum += parts[gg * 4 * nq + r];
      if (row < R2) s_dbc[row] = sum;
    }
    __syncthreads();
  }
}

// Phase B's scan (mixer_scan.cuh), with the dt bias loaded beside the state.
template <int J>
struct ScanLoads : MixerScanLoads<J> {
  float bias;
};

__device__ __forceinline__ ScanItem scan_item_of(const DecodeBlockArgs& a, const Plan& p, int i) {
  return scan_item_of(a, p.chunks_b, p.cpb, p.tpc, i);
}

// The item's loads that do not depend on phase A (the fused kernel issues them before its barrier).
template <int J>
__device__ __forceinline__ void scan_loads(const DecodeBlockArgs& a, const Plan& p, int i, ScanLoads<J>& L) {
  const ScanItem s = scan_item_of(a, p, i);
  load_scan_state<J>(a, s, p.tpc, L);
  L.bias = s.active ? a.dt_bias[s.e] : 0.f;
}

template <typename T, int J, bool X = false>
__device__ __forceinline__ void scan_finish(const DecodeBlockArgs& a, const Plan& p, const Workspace& ws, int i,
                                            ScanLoads<J>& L, float* s_dbc, bool issued = false, unsigned tag = 0) {
  const int64_t E = a.dim, R2 = r2_of(a);
  const ScanItem s = scan_item_of(a, p, i);
  const int64_t b = s.b, e = s.e;
  const int sub = s.sub;
  constexpr bool xt = X;  // tagged exchange: x and z once the partials are in
  float x = s.active && !xt ? __ldcg(ws.xc + b * E + e) : 0.f;
  float z = (s.active && sub == 0 && !xt) ? __ldcg(ws.z + b * E + e) : 0.f;
  const float Dp = (s.active && sub == 0) ? a.D[e] : 0.f;
  if (p.fold) {
    reduce_dbc<X>(a, ws, p, R2, b, s_dbc, issued, tag);
  } else {
    for (int64_t row = threadIdx.x; row < R2; row += kThreads) s_dbc[row] = __ldcg(ws.dbc + b * R2 + row);
  }
  if constexpr (xt) {
    if (s.active) {
      const Tagged tw = tagged_words(p.xbuf, a, p.tiles);
      x = wait_tagged(tw.xc + b * E + e, tag);
      if (sub == 0) z = wait_tagged(tw.z + b * E + e, tag);
    }
  }
  __syncthreads();
  stamp(a, 7);
  const float acc = scan_step<J>(a, s, p.tpc, L, L.bias, x, s_dbc);
  if (sub == 0 && s.active) {
    const float y = to_float(from_float<T>((acc + Dp * x) * silu(z)));
    if constexpr (xt) {
      put_tagged(tagged_words(p.xbuf, a, p.tiles).y + b * E + e, y, tag);
    } else {
      ws.y[b * E + e] = y;
    }
  }
}

// ---- phase C -----------------------------------------------------------------------------------------------------
constexpr int kNVC = 8;  // out_proj vectors per lane and pass

template <typename T, int V>
struct PhaseC {
  const T* wrow[1];
  bool valid[1];
  Pass<T, V, 1, kNVC> P;
};

// The loads of the item's first pass of out_proj weights (the fused kernel issues them before its barrier).
template <typename T, int V>
__device__ __forceinline__ void phase_c_loads(const DecodeBlockArgs& a, const Plan& p, int item, PhaseC<T, V>& S) {
  const int64_t E = a.dim, d = static_cast<int64_t>(item % p.rows_c) * kRowsC + threadIdx.x / 32;
  S.wrow[0] = static_cast<const T*>(a.out_proj_weight) + d * E;
  S.valid[0] = d < a.dmodel;
  load_pass<T, V, 1, kNVC>(S.wrow, S.valid, 0, 0, static_cast<int>(E < kChunk ? E : kChunk), S.P);
}

template <typename T, int V, int NB, bool X = false>
__device__ __forceinline__ void phase_c(const DecodeBlockArgs& a, const Plan& p, const Workspace& ws, int item,
                                        PhaseC<T, V>& S, float* act, unsigned tag = 0) {
  const int64_t E = a.dim, Dm = a.dmodel;
  const int64_t b0 = static_cast<int64_t>(item / p.rows_c) * kGroup;
  const int64_t d = static_cast<int64_t>(item % p.rows_c) * kRowsC + threadIdx.x / 32;
  const int nb = static_cast<int>(a.batch - b0 < NB ? a.batch - b0 : NB);
  float acc[1][NB];
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) acc[0][bb] = 0.f;
  for (int64_t k0 = 0; k0 < E; k0 += kChunk) {
    const int kc = static_cast<int>(E - k0 < kChunk ? E - k0 : kChunk);
    if (k0 > 0) load_pass<T, V, 1, kNVC>(S.wrow, S.valid, k0, 0, kc, S.P);
    if constexpr (X) {
      const unsigned long long* y = tagged_words(p.xbuf, a, p.tiles).y;
      for (int bb = 0; bb < nb; ++bb) gather_tagged(act + bb * kChunk, y + (b0 + bb) * E + k0, kc, tag);
    } else if (kc % 4 == 0 && E % 4 == 0) {
      for (int bb = 0; bb < nb; ++bb) stage(act + bb * kChunk, ws.y + (b0 + bb) * E + k0, kc);
    } else {
      for (int i = threadIdx.x; i < nb * kc; i += kThreads) {
        act[(i / kc) * kChunk + i % kc] = __ldcg(ws.y + (b0 + i / kc) * E + k0 + i % kc);
      }
    }
    __syncthreads();
    dot_chunk<T, V, 1, kNVC, NB>(S.wrow, S.valid, k0, kc, act, nb, S.P, acc);
    __syncthreads();
  }
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) {
    const float v = group_sum(acc[0][bb], 32);
    if (threadIdx.x % 32 == 0 && bb < nb && S.valid[0]) out[(b0 + bb) * Dm + d] = from_float<T>(v);
  }
}

// ---- kernels -----------------------------------------------------------------------------------------------------
// NB: the rows of a group the code is built for: 1 (batch 1, the latency-bound case) or kGroup.
template <typename T, typename R, int V, int NB>
__global__ void __launch_bounds__(kThreads, NB == 1 ? 2 : 1) a_kernel(DecodeBlockArgs a, Plan p) {
  __shared__ Shared sh;
  extern __shared__ float4 dyn[];
  phase_a<T, R, V, NB, kNVA>(a, p, split_workspace(a, p.tiles), blockIdx.x, sh, reinterpret_cast<float*>(dyn),
                             nullptr);
}

__global__ void __launch_bounds__(kThreads) reduce_kernel(DecodeBlockArgs a, Plan p) {
  extern __shared__ float4 dyn[];
  float* s_dbc = reinterpret_cast<float*>(dyn);
  const Workspace ws = split_workspace(a, p.tiles);
  const int64_t R2 = r2_of(a), b = blockIdx.x;
  reduce_dbc(a, ws, p, R2, b, s_dbc);
  __syncthreads();
  for (int64_t row = threadIdx.x; row < R2; row += kThreads) ws.dbc[b * R2 + row] = s_dbc[row];
}

template <typename T, int J>
__global__ void __launch_bounds__(kThreads) b_kernel(DecodeBlockArgs a, Plan p) {
  extern __shared__ float4 dyn[];
  ScanLoads<J> L;
  scan_loads<J>(a, p, blockIdx.x, L);
  scan_finish<T, J>(a, p, split_workspace(a, p.tiles), blockIdx.x, L, reinterpret_cast<float*>(dyn));
}

template <typename T, int V, int NB>
__global__ void __launch_bounds__(kThreads) c_kernel(DecodeBlockArgs a, Plan p) {
  extern __shared__ float4 dyn[];
  PhaseC<T, V> S;
  phase_c_loads<T, V>(a, p, blockIdx.x, S);
  phase_c<T, V, NB>(a, p, split_workspace(a, p.tiles), blockIdx.x, S, reinterpret_cast<float*>(dyn));
}

// One cooperative kernel (one group): block i runs item i of each phase that has one, with grid-wide barriers
// between the phases. Thread 0 first asks L2 for the block's out_proj rows and phase-B state, so that the later
// phases find them there; phase B's and phase C's own loads are issued before the barrier that precedes them.
// Batch 1 is held to 128 registers a thread, so that two blocks fit an SM: the next layer's kernel, launched early,
// then loads its weights beside this one's phases B and C.
// H100, 130m decode step with CUDA graphs (docs/gpu.md): with this bound 0.432-0.444 ms early start on, 0.477-0.483
// off; without it 0.448 on, 0.462 off.
template <typename T, typename R, int V, int J, int NB, bool X>
__global__ void __launch_bounds__(kThreads, NB == 1 ? 2 : 1) fused_kernel(DecodeBlockArgs a, Plan p) {
  __shared__ Shared sh;
  extern __shared__ float4 dyn[];
  float* act = reinterpret_cast<float*>(dyn);
  float* s_dbc = act + p.nb_max * kChunk;
  const Workspace ws = split_workspace(a, p.tiles);
  const int i = static_cast<int>(blockIdx.x);
  const int64_t E = a.dim, Dm = a.dmodel;
  const bool has_a = i < p.items_a(), has_b = i < a.batch * p.chunks_b, has_c = i < p.items_c();
  stamp(a, 0);
  if (threadIdx.x == 0) {
    if (has_c) {
      const int64_t d0 = i * kRowsC, rows = Dm - d0 < kRowsC ? Dm - d0 : kRowsC;
      prefetch_l2(static_cast<const T*>(a.out_proj_weight) + d0 * E, rows * E * static_cast<int64_t>(sizeof(T)));
    }
    if (has_b) {
      const int64_t b = i / p.chunks_b, e0 = static_cast<int64_t>(i % p.chunks_b) * p.cpb;
      const int64_t ch = E - e0 < p.cpb ? E - e0 : p.cpb;
      prefetch_l2(a.ssm_state_in + (b * E + e0) * a.dstate, ch * a.dstate * 4);
      prefetch_l2(a.dt_proj_weight + e0 * a.dt_rank, ch * a.dt_rank * 4);
      prefetch_l2(a.A + e0 * a.dstate, ch * a.dstate * 4);
    }
  }
  constexpr bool xt = X;
  if (has_a) {
    phase_a<T, R, V, NB, kNVA, X>(a, p, ws, i, sh, act, s_dbc + dbc_floats(p, r2_of(a)));
  } else {
    pdl_wait();
    pdl_trigger();
    stamp(a, 1);
    if (xt && threadIdx.x == 0) sh.tag = launch_tag(p.xbuf);
  }
  ScanLoads<J> L;
  if (has_b) scan_loads<J>(a, p, i, L);
  PhaseC<T, V> S;
  stamp(a, 5);
  if constexpr (xt) {
    __syncthreads();  // sh.tag
  } else {
    grid_barrier(p.barrier);
  }
  stamp(a, 6);
  // A block with a phase-B item first asks for the partials (one round), so that they do not queue behind its out_proj
  // rows: chain benchmark, H100, 130m 11.72-11.79 -> 11.59-11.67 us a layer (three runs). Tried and slower: the C-only
  // blocks loading their rows before the barrier (12.10), the partials as one TMA bulk copy (12.4-12.9; the cp.async
  // copies of the round take ~2 us after the barrier, timeline build).
  const bool issued = !xt && has_b && p.fold && one_round(p, r2_of(a));
  if (issued) issue_partials(ws, p, r2_of(a), i / p.chunks_b, s_dbc, 0, p.tiles);
  if (has_c) phase_c_loads<T, V>(a, p, i, S);
  const unsigned tag = xt ? sh.tag : 0u;
  if (has_b) scan_finish<T, J, X>(a, p, ws, i, L, s_dbc, issued, tag);
  stamp(a, 8);
  if constexpr (!xt) grid_barrier(p.barrier);
  stamp(a, 9);
  if (has_c) phase_c<T, V, NB, X>(a, p, ws, i, S, act, tag);
  stamp(a, 10);
  if constexpr (xt) {
    if (threadIdx.x == 0) {  // the block has finished: count it (see "tagged exchange")
      asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(p.xbuf) : "memory");
    }
  }
}

// ---- launch ------------------------------------------------------------------------------------------------------
int forced_path() {
  const char* mode = std::getenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK");
  if (mode == nullptr) return 0;
  if (std::strcmp(mode, "split") == 0) return 1;
  if (std::strcmp(mode, "unfolded") == 0) return 2;
  return 0;
}

// Whether the fused kernel may start before the previous kernel on the stream has finished: its early reads must be
// of constant weights, the device must have griddepcontrol (sm_90+), and MAMBA_EXPORT_CUDA_PDL=0 turns it off.
bool early_start(bool constant_weights) {
  const char* env = std::getenv("MAMBA_EXPORT_CUDA_PDL");
  if (!constant_weights || (env != nullptr && std::strcmp(env, "0") == 0)) return false;
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
}

// The current device, for a per-stream resource of the fused kernel on `stream`, or -1 where it gets none: the
// environment variable `env` set to `off`, the stream cudaStreamPerThread (not one stream for every host thread), or
// no current device.
int stream_device(cudaStream_t stream, const char* env, const char* off) {
  const char* value = std::getenv(env);
  int device = 0;
  if ((value != nullptr && std::strcmp(value, off) == 0) || stream == cudaStreamPerThread ||
      cudaGetDevice(&device) != cudaSuccess) {
    return -1;
  }
  return device;
}

// The fused kernel's barrier word for launches on `stream` of the current device (see grid_barrier()): nullptr where
// the stream is not one stream for every host thread (cudaStreamPerThread) or every word is taken (then the kernel
// uses cooperative groups' barrier). MAMBA_EXPORT_CUDA_CG_BARRIER=1 always gives nullptr.
unsigned* barrier_word(cudaStream_t stream) {
  struct Owner {
    int device;
    cudaStream_t stream;
    unsigned* word;
  };
  static std::mutex mutex;
  static std::vector<Owner> owners;  // word i of g_barrier_words belongs to owners[i]
  const int device = stream_device(stream, "MAMBA_EXPORT_CUDA_CG_BARRIER", "1");
  if (device < 0) return nullptr;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Owner& o : owners) {
    if (o.device == device && o.stream == stream) return o.word;
  }
  void* base = nullptr;
  if (owners.size() >= static_cast<size_t>(kBarrierWords)) return nullptr;
  if (cudaGetSymbolAddress(&base, g_barrier_words) != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return nullptr;
  }
  owners.push_back({device, stream, static_cast<unsigned*>(base) + owners.size()});
  return owners.back().word;
}

// The fused kernel's tagged-exchange buffer (see "tagged exchange") for `grid` blocks on `stream` of the current
// device at a's sizes: allocated and zeroed on first use, then kept for the process (a CUDA graph holds its address).
// nullptr (the kernel then uses the workspace and grid barriers) where the stream is cudaStreamPerThread, it is being
// captured and has no buffer yet, the allocation fails, or MAMBA_EXPORT_CUDA_TAGGED=0.
unsigned long long* exchange_buffer(cudaStream_t stream, unsigned grid, const DecodeBlockArgs& a, int tiles) {
  struct Owner {
    int device;
    cudaStream_t stream;
    unsigned grid;
    int64_t batch, dim, r2;
    unsigned long long* words;
  };
  static std::mutex mutex;
  static std::vector<Owner> owners;
  const int device = stream_device(stream, "MAMBA_EXPORT_CUDA_TAGGED", "0");
  if (device < 0) return nullptr;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Owner& o : owners) {
    if (o.device == device && o.stream == stream && o.grid == grid && o.batch == a.batch && o.dim == a.dim &&
        o.r2 == r2_of(a)) {
      return o.words;
    }
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    cudaGetLastError();
    return nullptr;
  }
  const size_t bytes = static_cast<size_t>(tagged_words_count(a, tiles)) * sizeof(unsigned long long);
  void* words = nullptr;
  if (cudaMalloc(&words, bytes) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (cudaMemsetAsync(words, 0, bytes, stream) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(words);
    return nullptr;
  }
  owners.push_back({device, stream, grid, a.batch, a.dim, r2_of(a), static_cast<unsigned long long*>(words)});
  return owners.back().words;
}

// kernel<<<grid, kThreads, smem, stream>>>(a, p), cooperative when `coop`, with programmatic dependent launch when
// p.pdl; a launch refused with that attribute is made again without it (and p.pdl false).
template <typename Kernel, typename Args, typename P>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Args& a, P p, bool coop) {
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (coop) {
    attrs[n].id = cudaLaunchAttributeCooperative;
    attrs[n++].val.cooperative = 1;
  }
  if (p.pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = n;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, a, p);
  if (err == cudaSuccess || !p.pdl) return err;
  (void)cudaGetLastError();
  p.pdl = false;
  return launch_kernel(kernel, grid, smem, stream, a, p, coop);
}

Plan make_plan(const DecodeBlockArgs& a, int J) {
  Plan p{};
  const int64_t R2 = r2_of(a);
  p.tiles = static_cast<int>((a.dim + kTileA - 1) / kTileA);
  p.groups = static_cast<int>((a.batch + kGroup - 1) / kGroup);
  p.rows_c = static_cast<int>((a.dmodel + kRowsC - 1) / kRowsC);
  p.tpc = next_pow2((a.dstate + J - 1) / J);
  p.cpb = kThreads / p.tpc;
  p.chunks_b = static_cast<int>((a.dim + p.cpb - 1) / p.cpb);
  p.nb_max = static_cast<int>(a.batch < kGroup ? a.batch : kGroup);
  return p;
}

// Lets `kernel` take `bytes` of dynamic shared memory on top of its static part (needed past 48 KiB in all).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, typename R, int V, int J, int NB>
cudaError_t launch(const DecodeBlockArgs& a, cudaStream_t stream) {
  Plan p = make_plan(a, J);
  const int64_t R2 = r2_of(a), items_b = a.batch * p.chunks_b;
  const int forced = forced_path();
  p.fold = forced == 1 || (forced != 2 && items_b * p.tiles * pad4(R2) <= kMaxFoldedReads);
  p.pdl = NB == 1 && early_start(a.constant_weights);  // the fused batch-1 kernel only: see "Early start" above
  const size_t act_bytes = static_cast<size_t>(p.nb_max) * kChunk * sizeof(float);
  const size_t dbc_bytes = static_cast<size_t>(dbc_floats(p, R2)) * sizeof(float);  // dbc, the sum's parts, staging
  int device = 0, coop = 0;
  if (forced == 0 && p.fold && p.groups == 1 && cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) == cudaSuccess && coop != 0) {
    const auto kernel = fused_kernel<T, R, V, J, NB, false>;
    // Batch 1: room for the row's residual and x, staged by cp.async (phase_a).
    const size_t rows_bytes = NB == 1 && a.dmodel <= kChunk ? a.dmodel * (sizeof(R) + sizeof(T)) : 0;
    const size_t smem = act_bytes + dbc_bytes + rows_bytes;
    if (cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
    int per_sm = 0;
    if (cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
        err != cudaSuccess) {
      return err;
    }
    // One block an SM at most, even where two fit: the second place is the next layer's, started early. (A 1.4b
    // layer's 256 items in two blocks an SM took its batch-1 step from 2.18 to 2.70 ms on the H100; split kernels.)
    const int sms = sm_count();
    const int64_t resident = static_cast<int64_t>(per_sm < 1 ? per_sm : 1) * sms;
    int64_t want = p.items_a() > items_b ? p.items_a() : items_b;
    if (p.items_c() > want) want = p.items_c();
    if (want <= resident) {
      p.barrier = barrier_word(stream);
      // The tagged exchange where the partials' rows have no padding (r2 a multiple of 4, as in every released
      // Mamba): writing the padding words took 0.25 us a 130m layer even where r2 has none (chain benchmark, H100).
      p.xbuf = R2 % 4 == 0 ? exchange_buffer(stream, static_cast<unsigned>(want), a, p.tiles) : nullptr;
      if (p.xbuf != nullptr) {
        const auto tagged = fused_kernel<T, R, V, J, NB, true>;
        if (cudaError_t err = allow_smem(tagged, smem); err != cudaSuccess) return err;
        return launch_kernel(tagged, dim3(static_cast<unsigned>(want)), smem, stream, a, p, true);
      }
      return launch_kernel(kernel, dim3(static_cast<unsigned>(want)), smem, stream, a, p, true);
    }
  }
  if (p.items_a() > 0x7fffffff || items_b > 0x7fffffff || p.items_c() > 0x7fffffff) return cudaErrorInvalidValue;
  p.pdl = false;
  {
    const auto kernel = a_kernel<T, R, V, NB>;
    if (cudaError_t err = allow_smem(kernel, act_bytes); err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(p.items_a()));
    if (cudaError_t err = launch_kernel(kernel, grid, act_bytes, stream, a, p, false); err != cudaSuccess) {
      return err;
    }
  }
  if (!p.fold) {
    if (cudaError_t err = allow_smem(reduce_kernel, dbc_bytes); err != cudaSuccess) return err;
    reduce_kernel<<<static_cast<unsigned>(a.batch), kThreads, dbc_bytes, stream>>>(a, p);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  if (cudaError_t err = allow_smem(b_kernel<T, J>, dbc_bytes); err != cudaSuccess) return err;
  b_kernel<T, J><<<static_cast<unsigned>(items_b), kThreads, dbc_bytes, stream>>>(a, p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  {
    const auto kernel = c_kernel<T, V, NB>;
    if (cudaError_t err = allow_smem(kernel, act_bytes); err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(p.items_c()), kThreads, act_bytes, stream>>>(a, p);
  }
  return cudaGetLastError();
}

// The batch-1 code (NB = 1) for the common shapes (16-byte weight rows, d_state <= 128); kGroup rows otherwise.
template <typename T, typename R>
cudaError_t dispatch(const DecodeBlockArgs& a, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const bool vec = a.dmodel % V == 0 && a.dim % V == 0 && aligned16(a.in_proj_weight) &&
                   aligned16(a.out_proj_weight);
  if (a.dstate > 128) return vec ? launch<T, R, V, 8, kGroup>(a, stream) : launch<T, R, 1, 8, kGroup>(a, stream);
  if (!vec) return launch<T, R, 1, 4, kGroup>(a, stream);
  // Batch 1 holds 2 states a thread (8 threads a channel, 32 channels an item): twice the phase-B items of J = 4, each
  // half as long (H200 chain, same call: 130m 11.66 -> 11.52 us a layer, 1.4b 33.77 -> 33.38; J = 1 was slower).
  return a.batch == 1 ? launch<T, R, V, 2, 1>(a, stream) : launch<T, R, V, 4, kGroup>(a, stream);
}

// ---- DecodeHead ----------------------------------------------------------------------------------------------------
// The decode step's tail (mamba_cuda.h): AddRMSNorm of the last layer's output, then the LM head's rows against it.
// Block (g, j) takes sequence group g (NB rows) and the LM head rows [j * rows_per_block, ...): it computes the
// group's norm itself (phase A's order, so the same bits as DecodeBlock's norm), keeps the normalised rows (rounded to
// T) in shared memory [chunk][NB][kChunk], and each warp takes kHeadRows rows at a time, every dot product a warp's
// (the DecodeBlock products' order). A warp issues its next rows' first loads before it sums and stores the last.
// Groups vary fastest, so the groups' blocks of the same rows run together and the rows come from HBM once.
// Early start (constant weights, sm_90+): launched to start while the last DecodeBlock runs, thread 0 of each block of
// group 0 asks L2 for the first early_bytes of its rows (half the L2 over all blocks) and each warp loads its first
// rows before pdl_wait(). H100, mamba-130m (50,280 x 768 float16): the kernel alone (no early start) 30.2 us, against
// 29.4 + 2.7 us for cuBLAS's GEMV after the AddRMSNorm kernel; in a CUDA-graph decode step 1-4 us less than
// AddRMSNorm + MatMul (tools/ab_decode_exports.py). Chain benchmark (--head 50280, after 24 layers): 39.2-39.5 us more
// than the layers without the early start, 34.5-35.0 with it. The early L2 request: 34.5-35.0 with, 32.5-37.7 without
// over four runs (alone 31.6-31.9 with, 31.8-32.2 without), kept. Asking L2 for all the rows after the wait: 35.6 us
// alone against 30.2 (more than the L2 holds: evicted before use); two slots of 2 rows a warp (one's loads in flight
// while the other's are multiplied): 31.2 us alone against 31.9 but 35.8-36.0 after the layers and slower at batch 8.
constexpr int kHeadRows = 4;   // LM head rows a warp takes at a time
constexpr int kHeadNV = 3;     // weight vectors per lane and row in one pass (one pass: d = 768 in 16-bit types)

struct HeadPlan {
  int64_t rows_per_block;
  int64_t early_bytes;          // of each block's rows, asked for before pdl_wait()
  int chunks;                   // of kChunk values of a row
  bool pdl;                     // launched to start before the previous kernel has finished
};

template <typename T, typename R, int V, int NB>
__global__ void __launch_bounds__(kThreads, 2) head_kernel(DecodeHeadArgs a, HeadPlan hp) {
  constexpr int Q = kHeadRows;
  extern __shared__ float4 dyn[];
  float* act = reinterpret_cast<float*>(dyn);  // [chunks][NB][kChunk]
  __shared__ float s_sq[kWarps][kGroup], s_scale[kGroup];
  const int64_t Dm = a.dmodel, Vn = a.vocab;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * NB;
  const int nb = static_cast<int>(a.batch - b0 < NB ? a.batch - b0 : NB);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * hp.rows_per_block;
  const int64_t r1 = Vn - r0 < hp.rows_per_block ? Vn : r0 + hp.rows_per_block;
  const T* W = static_cast<const T*>(a.weight);
  const int64_t range_bytes = (r1 - r0) * Dm * static_cast<int64_t>(sizeof(T));
  const int64_t early = hp.early_bytes < range_bytes ? hp.early_bytes / 16 * 16 : range_bytes;
  if (threadIdx.x == 0 && blockIdx.x == 0) prefetch_l2(W + r0 * Dm, early);

  const T* wrow[Q];
  bool valid[Q];
  const auto set_rows = [&](int64_t row) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      valid[q] = row + q < r1;
      wrow[q] = W + (valid[q] ? row + q : r0) * Dm;
    }
  };
  int64_t row = r0 + static_cast<int64_t>(warp) * Q;
  set_rows(row);
  Pass<T, V, Q, kHeadNV> P;
  load_pass<T, V, Q, kHeadNV>(wrow, valid, 0, 0, static_cast<int>(Dm < kChunk ? Dm : kChunk), P);
  pdl_wait();
  pdl_trigger();

  // The norm: r = R(residual + x); thread t sums r^2 over k = t, t + kThreads, ... in order (phase A's order).
  const T* xin = static_cast<const T*>(a.x);
  const R* res = static_cast<const R*>(a.residual);
  const T* nw = static_cast<const T*>(a.norm_weight);
  const auto at = [&](int bb, int64_t k) -> float& { return act[((k / kChunk) * NB + bb) * kChunk + k % kChunk]; };
  float sq[NB];
#pragma unroll
  for (int bb = 0; bb < NB; ++bb) {
    sq[bb] = 0.f;
    if (bb >= nb) continue;
    for (int64_t k = threadIdx.x; k < Dm; k += kThreads) {
      const float v = to_float(from_float<R>(to_float(res[(b0 + bb) * Dm + k]) + to_float(xin[(b0 + bb) * Dm + k])));
      at(bb, k) = v;
      sq[bb] += v * v;
    }
  }
  block_scales<NB>(sq, nb, Dm, a.epsilon, s_sq, s_scale);
  for (int64_t k = threadIdx.x; k < Dm; k += kThreads) {
    const float g = to_float(nw[k]);
    for (int bb = 0; bb < nb; ++bb) at(bb, k) = to_float(from_float<T>(at(bb, k) * s_scale[bb] * g));
  }
  __syncthreads();

  T* logits = static_cast<T*>(a.logits);
  for (; row < r1; row += static_cast<int64_t>(kWarps) * Q) {
    float acc[Q][NB];
#pragma unroll
    for (int q = 0; q < Q; ++q)
#pragma unroll
      for (int bb = 0; bb < NB; ++bb) acc[q][bb] = 0.f;
    for (int c = 0; c < hp.chunks; ++c) {
      const int64_t k0 = static_cast<int64_t>(c) * kChunk;
      const int kc = static_cast<int>(Dm - k0 < kChunk ? Dm - k0 : kChunk);
      if (c > 0) load_pass<T, V, Q, kHeadNV>(wrow, valid, k0, 0, kc, P);
      dot_chunk<T, V, Q, kHeadNV, NB>(wrow, valid, k0, kc, act + static_cast<int64_t>(c) * NB * kChunk, nb, P, acc);
    }
    bool was_valid[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) was_valid[q] = valid[q];
    const int64_t next = row + static_cast<int64_t>(kWarps) * Q;
    if (next < r1) {
      set_rows(next);
      load_pass<T, V, Q, kHeadNV>(wrow, valid, 0, 0, static_cast<int>(Dm < kChunk ? Dm : kChunk), P);
    }
#pragma unroll
    for (int q = 0; q < Q; ++q) {
#pragma unroll
      for (int bb = 0; bb < NB; ++bb) {
        const float v = group_sum(acc[q][bb], 32);
        if (lane == 0 && bb < nb && was_valid[q]) logits[(b0 + bb) * Vn + row + q] = from_float<T>(v);
      }
    }
  }
}

template <typename T, typename R, int V, int NB>
cudaError_t launch_head(const DecodeHeadArgs& a, cudaStream_t stream) {
  const auto kernel = head_kernel<T, R, V, NB>;
  HeadPlan hp{};
  hp.chunks = ceil_div(a.dmodel, kChunk);
  const size_t smem = static_cast<size_t>(hp.chunks) * NB * kChunk * sizeof(float);
  int device = 0, l2 = 0, smem_max = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      err != cudaSuccess) {
    return err;
  }
  if (smem + sizeof(float) * (kWarps + 1) * NB > static_cast<size_t>(smem_max)) return cudaErrorInvalidValue;
  if (cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess) {
    (void)cudaGetLastError();
    l2 = 0;
  }
  // Two blocks an SM of rows, in whole warp passes (kWarps * kHeadRows rows).
  constexpr int64_t kStep = static_cast<int64_t>(kWarps) * kHeadRows;
  const int64_t want = 2 * static_cast<int64_t>(sm_count());
  hp.rows_per_block = (a.vocab + want - 1) / want;
  hp.rows_per_block = (hp.rows_per_block + kStep - 1) / kStep * kStep;
  const int64_t blocks = (a.vocab + hp.rows_per_block - 1) / hp.rows_per_block;
  const int64_t groups = (a.batch + NB - 1) / NB;
  hp.early_bytes = static_cast<int64_t>(l2) / 2 / blocks;
  if (blocks > 65535 || groups > 0x7fffffff) return cudaErrorInvalidValue;
  hp.pdl = early_start(a.constant_weights);
  return launch_kernel(kernel, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(blocks)), smem, stream, a,
                       hp, false);
}

}  // namespace

size_t decode_block_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank) {
  const int64_t r2 = dt_rank + 2 * dstate, tiles = (dim + kTileA - 1) / kTileA;
  return static_cast<size_t>(2 * pad4(batch * dim) + batch * tiles * pad4(r2) + pad4(batch * r2) + batch * dim) *
         sizeof(float);
}

cudaError_t decode_block(const DecodeBlockArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.dim < 0 || a.dim > kMaxDim || a.dmodel < 1 || a.dmodel > kMaxDim || a.dstate < 1 ||
      a.dstate > kMaxDState || a.width < 1 || a.width > kMaxDConv || a.dt_rank < 1 || a.dt_rank > kMaxDim ||
      a.batch > 65535 || a.workspace == nullptr ||
      (a.residual_dtype != DType::kFloat32 && a.residual_dtype != a.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (a.residual_dtype == DType::kFloat32) return dispatch<T, float>(a, stream);
    return dispatch<T, T>(a, stream);
  });
}

cudaError_t decode_head(const DecodeHeadArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.batch > 65535 * int64_t{kGroup} || a.dmodel < 1 || a.dmodel > kMaxDim || a.vocab < 1 ||
      a.vocab > kMaxDim || (a.residual_dtype != DType::kFloat32 && a.residual_dtype != a.dtype)) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    constexpr int V = static_cast<int>(16 / sizeof(T));
    const bool vec = a.dmodel % V == 0 && aligned16(a.weight);
    const auto go = [&](auto r_tag) -> cudaError_t {
      using R = decltype(r_tag);
      if (a.batch == 1) return vec ? launch_head<T, R, V, 1>(a, stream) : launch_head<T, R, 1, 1>(a, stream);
      return vec ? launch_head<T, R, V, kGroup>(a, stream) : launch_head<T, R, 1, kGroup>(a, stream);
    };
    if (a.residual_dtype == DType::kFloat32) return go(float{});
    return go(T{});
  });
}

}  // namespace mamba_cuda
