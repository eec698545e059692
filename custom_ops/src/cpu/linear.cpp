// The linear layer of LinearF16W, LinearI8W and DecodeBlock on the CPU (see cpu_kernels.h): y = x W^T with float32,
// float16 or int8 weights (widened to float32 in registers), summed in float32; int8 rows are then multiplied by
// their scale. A decode step's matrix-vector products are bound by memory, so reading 2 bytes (or 1) per weight
// instead of 4 halves (quarters) their time, provided the widening keeps up with the memory; float32 weights take
// the same loops without the widening.
//
// A task owns a contiguous block of output rows (about kTaskBytes of weights). Below 16 rows of x it reads the block
// front to back, one row after the other: a single sequential stream, which the prefetchers follow at full speed
// (working on 2, 4 or 8 rows at once, to reuse each load of x, read memory at half the speed on the first AMD host:
// several streams 1.5-3 KB apart; x stays in L1 anyway). Along a row, 16 running sums in vector lanes per row of x
// (32 with AVX-512), reduced at the end of every chunk of kChunk values, then a scalar tail when K is not a multiple
// of the vector width. With several rows of x, each chunk of a weight row is read from memory once and widened once
// per kRowsOfX rows of x (the next rows of x find it in L1), so the weights are read from memory once per call
// whatever the batch. From 16 rows of x (chunk_major) the loops turn around: chunk by chunk, 4 rows of x at a time
// against every weight row of the task, so that those rows of x stay in L1 (32 rows of a 512-value chunk are 64 KB)
// and the task's weights (64 KB) come from L2; with AVX-512, float16 and int8 weights are first widened into a float32
// block of 15 rows (packed_major), so that each weight is widened once per call and not once per 4 rows of x. Every
// element of y adds the same chunk sums in the same order in all these orders, so a result depends neither on the
// batch nor on the thread count.
//
// Three implementations of the inner loops, the CPU choosing once: on x86-64 CPUs with AVX-512F, 16-float vectors and
// two weight rows per call (each load of x serves both; 16 accumulators of the 32 registers; three rows of a packed
// block, 24 accumulators); with AVX2, FMA and F16C, 8-float vectors and one weight row (vcvtph2ps widens 8 float16
// weights in one instruction; GCC 12 does not vectorise float16 conversions, and the portable bit-level conversion
// takes about a dozen instructions per 8 weights, which made the loop compute-bound at half the memory bandwidth;
// int8 takes vpmovsxbd + vcvtdq2ps per 8 weights); elsewhere portable loops, compiled as MAMBA_CLONES. A build with
// MAMBA_EXPORT_OPS_NO_CLONES uses the intrinsics only when compiled for them (-march=x86-64-v3: AVX2; x86-64-v4:
// AVX-512). The AVX-512 loops sum in another order than the AVX2 ones, so results differ between such CPUs by
// float32 rounding (never within one).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    (!defined(MAMBA_EXPORT_OPS_NO_CLONES) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)))
#define MAMBA_LINEAR_F16C 1
#include <immintrin.h>
#define MAMBA_F16C_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define MAMBA_LINEAR_F16C 0
#endif
#if MAMBA_LINEAR_F16C && (!defined(MAMBA_EXPORT_OPS_NO_CLONES) || defined(__AVX512F__))
#define MAMBA_LINEAR_AVX512 1
#define MAMBA_AVX512_TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
#else
#define MAMBA_LINEAR_AVX512 0
#endif

namespace mamba_export_ops {
namespace {

constexpr size_t kLanes = 16;             // running sums per row
constexpr size_t kChunk = 512;            // K values per reduction (a multiple of kLanes)
constexpr size_t kRowsOfX = 4;            // rows of x per pass over a chunk of weights (batch > 1)
static_assert(kRowsOfX == 4, "passes_over_x handles the last 1 to 3 rows of x case by case");
// Software prefetch 4 KB ahead along the row, in the first pass over each chunk (the one that reads it from memory),
// at every batch size. With a batch the loop is busy enough that the hardware prefetchers fall behind (2 KB ahead:
// batch 4 and 8 of mamba-130m's GEMVs 20-25% faster on the AMD EPYC host of the first measurements). At batch 1 it
// gained nothing there and was left out, but on the Intel Xeon host of the twenty-eighth session, where one core's
// sequential read otherwise stays near 7 GB/s, it made the 49 products of a mamba-130m decode step ~30% faster
// (float16 14.50 -> 10.47 ms, int8 10.12 -> 7.02; 2 KB and 8 KB ahead less so). Prefetching in the later passes
// too, which find the chunk in L1, made batch 32 25% slower (BENCHMARKS.md section 8).
constexpr size_t kPrefetchBytes = 4096;
constexpr size_t kTaskBytes = 64 * 1024;  // weights per task: 64 per in_proj, 24 per out_proj of mamba-130m
constexpr size_t kTaskRowMultiple = 16;   // task blocks end on a 64-byte line of y

// The portable inner loops: float16 and int8 widened by vec::to_float, vectorised by the compiler.
struct Portable {
  // sums[m] = sum over i < len of float32(w[i]) * x[m * ldx + i] for kM rows of x: kLanes running sums per row of
  // x, one tree reduction, then the scalar tail. Each weight is loaded and widened once for the kM rows.
  static constexpr size_t kRows = 1;        // rows of W per call of dots
  static constexpr size_t kPackedRows = 0;  // no packed_major

  template <size_t kM, size_t kR, bool kPrefetch, typename W>
  static void dots(const W* __restrict w, size_t, const float* __restrict x, size_t ldx, size_t len, float* sums) {
    static_assert(kR == 1, "one row of W at a time");
    float acc[kM][kLanes] = {};
    size_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      if (kPrefetch) __builtin_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes);
      float wf[kLanes];
#pragma omp simd
      for (size_t j = 0; j < kLanes; ++j) wf[j] = vec::to_float(w[i + j]);
      for (size_t m = 0; m < kM; ++m) {
#pragma omp simd
        for (size_t j = 0; j < kLanes; ++j) acc[m][j] += wf[j] * x[m * ldx + i + j];
      }
    }
    for (size_t m = 0; m < kM; ++m) {
      for (size_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma omp simd
        for (size_t j = 0; j < width; ++j) acc[m][j] += acc[m][j + width];
      }
      float tail = 0.0f;
      for (size_t t = i; t < len; ++t) tail += vec::to_float(w[t]) * x[m * ldx + t];
      sums[m] = acc[m][0] + tail;
    }
  }
};

#if MAMBA_LINEAR_F16C
// The x86-64 inner loops: vcvtph2ps + FMA on 8-float vectors, two running vectors (16 sums) per row of x.
struct F16c {
  MAMBA_F16C_TARGET static __m256 load8(const half_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  MAMBA_F16C_TARGET static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  MAMBA_F16C_TARGET static __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  MAMBA_F16C_TARGET static float widen(half_t w) { return _cvtsh_ss(w.bits); }
  MAMBA_F16C_TARGET static float widen(int8_t w) { return float(w); }
  MAMBA_F16C_TARGET static float widen(float w) { return w; }

  MAMBA_F16C_TARGET static float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static constexpr size_t kRows = 1;        // rows of W per call of dots (16 registers)
  static constexpr size_t kPackedRows = 0;  // no packed_major: with one row a call, x's loads bound it

  template <size_t kM, size_t kR, bool kPrefetch, typename W>
  MAMBA_F16C_TARGET static void dots(const W* __restrict w, size_t, const float* __restrict x, size_t ldx,
                                     size_t len, float* sums) {
    static_assert(kR == 1, "one row of W at a time");
    __m256 lo[kM], hi[kM];
    for (size_t m = 0; m < kM; ++m) lo[m] = hi[m] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m256 w0 = load8(w + i), w1 = load8(w + i + 8);
      if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes, _MM_HINT_T0);
      for (size_t m = 0; m < kM; ++m) {
        lo[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + i), lo[m]);
        hi[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + i + 8), hi[m]);
      }
    }
    if (i + 8 <= len) {
      const __m256 w0 = load8(w + i);
      for (size_t m = 0; m < kM; ++m) lo[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + i), lo[m]);
      i += 8;
    }
    for (size_t m = 0; m < kM; ++m) {
      float s = sum8(_mm256_add_ps(lo[m], hi[m]));
      for (size_t t = i; t < len; ++t) s = std::fma(widen(w[t]), x[m * ldx + t], s);
      sums[m] = s;
    }
  }
};
#endif

#if MAMBA_LINEAR_AVX512
// The AVX-512 inner loops: 16-float vectors, two running vectors (32 sums) per pair of a row of W and a row of x, and
// kR = 2 rows of W at a time against up to 4 rows of x (16 accumulators of the 32 registers), so that each load of x
// serves two rows of W: with a batch, the one-row loops above are bound by their loads of x.
struct Avx512 {
  static constexpr size_t kRows = 2;
  static constexpr size_t kPackedRows = 3;  // in packed_major: 24 accumulators

  MAMBA_AVX512_TARGET static __m512 load16(const half_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  MAMBA_AVX512_TARGET static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
  MAMBA_AVX512_TARGET static __m512 load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }

  // acc[r][m] += w[r * ldw : +16] * x[m * ldx : +16] (one FMA each): the kR rows of w first, then each row of x
  // loaded once into a register (an empty asm keeps GCC from folding it into the FMAs, which loaded it kR times).
  template <size_t kM, size_t kR, typename W>
  MAMBA_AVX512_TARGET static void half_step(const W* __restrict w, size_t ldw, const float* __restrict x, size_t ldx,
                                            __m512 (&acc)[kR][kM]) {
    __m512 wv[kR];
    for (size_t r = 0; r < kR; ++r) wv[r] = load16(w + r * ldw);
    for (size_t m = 0; m < kM; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx);
      __asm__("" : "+v"(xv));
      for (size_t r = 0; r < kR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }

  // sums[r * kM + j] = row r of w (rows ldw apart) . row j of x, for kR rows of w and kM rows of x.
  template <size_t kM, size_t kR, bool kPrefetch, typename W>
  MAMBA_AVX512_TARGET static void dots(const W* __restrict w, size_t ldw, const float* __restrict x, size_t ldx,
                                       size_t len, float* sums) {
    __m512 lo[kR][kM], hi[kR][kM];
    for (size_t r = 0; r < kR; ++r) {
      for (size_t m = 0; m < kM; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_ps();
    }
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
      if (kPrefetch) {
        for (size_t r = 0; r < kR; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + i) + kPrefetchBytes, _MM_HINT_T0);
        }
      }
      half_step<kM, kR>(w + i, ldw, x + i, ldx, lo);
      half_step<kM, kR>(w + i + 16, ldw, x + i + 16, ldx, hi);
    }
    if (i + 16 <= len) {
      half_step<kM, kR>(w + i, ldw, x + i, ldx, lo);
      i += 16;
    }
    for (size_t r = 0; r < kR; ++r) {
      if constexpr (kM == 4) {
        reduce4(_mm512_add_ps(lo[r][0], hi[r][0]), _mm512_add_ps(lo[r][1], hi[r][1]),
                _mm512_add_ps(lo[r][2], hi[r][2]), _mm512_add_ps(lo[r][3], hi[r][3]), sums + r * kM);
      } else {
        for (size_t m = 0; m < kM; ++m) sums[r * kM + m] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][m], hi[r][m]));
      }
      for (size_t m = 0; m < kM; ++m) {
        float s = sums[r * kM + m];
        for (size_t t = i; t < len; ++t) s = std::fma(F16c::widen(w[r * ldw + t]), x[m * ldx + t], s);
        sums[r * kM + m] = s;
      }
    }
  }

  // out[j] = _mm512_reduce_add_ps(v_j) for 4 vectors at once, with the same additions in the same pairs: GCC's
  // reduction adds the two 8-lane halves, then the two 4-lane halves of that, then lanes j and j ^ 2, then lanes 0 and
  // 1 (float addition is commutative, so which operand comes first does not change a bit).
  MAMBA_AVX512_TARGET static void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));  // a's 8 | b's 8
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));  // 4 lanes each of a, b, c, d
    q = _mm512_add_ps(q, _mm512_permute_ps(q, _MM_SHUFFLE(1, 0, 3, 2)));  // lane j + lane j ^ 2
    q = _mm512_add_ps(q, _mm512_permute_ps(q, _MM_SHUFFLE(2, 3, 0, 1)));  // lane 0 + lane 1
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, q);
    for (size_t j = 0; j < 4; ++j) out[j] = lanes[4 * j];
  }

  template <typename W>
  MAMBA_AVX512_TARGET static void widen_run(const W* __restrict src, float* __restrict dst, size_t len) {
    size_t i = 0;
    for (; i + 16 <= len; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
    for (; i < len; ++i) dst[i] = F16c::widen(src[i]);
  }
};
#endif

// y[mi + j, row + r] += the dot products of kM rows of x, starting at row mi, with the chunk [c0, c0 + len) of the
// kR weight rows from `row` on, whose chunk starts at w (rows ldw apart: a.k in W itself, kChunk in a packed block).
template <class Path, size_t kR, size_t kM, bool kPrefetch, typename V, typename W>
inline void add_dots(const LinearArgs<W>& a, const V* w, size_t ldw, size_t row, size_t mi, size_t c0, size_t len) {
  float part[kR * kM];
  Path::template dots<kM, kR, kPrefetch>(w, ldw, a.x + mi * a.k + c0, a.k, len, part);
  for (size_t r = 0; r < kR; ++r) {
    for (size_t j = 0; j < kM; ++j) a.y[(mi + j) * a.n + row + r] += part[r * kM + j];
  }
}

// Calls pass(rows, prefetch, mi) for the rows of x [mi, mi + rows) of one chunk, kRowsOfX at a time and then the
// last 1 to 3, rows and prefetch as compile-time constants: only the first pass over a chunk reads it from memory
// (and prefetches); the later ones find it in L1.
template <typename Pass>
inline void passes_over_x(size_t m, const Pass& pass) {
  using Yes = std::true_type;
  using No = std::false_type;
  size_t mi = 0;
  for (; mi + kRowsOfX <= m; mi += kRowsOfX) {
    if (mi == 0) {
      pass(std::integral_constant<size_t, kRowsOfX>{}, Yes{}, mi);
    } else {
      pass(std::integral_constant<size_t, kRowsOfX>{}, No{}, mi);
    }
  }
  const auto last = [&](auto rows) {
    if (mi == 0) {
      pass(rows, Yes{}, mi);
    } else {
      pass(rows, No{}, mi);
    }
  };
  switch (m - mi) {
    case 3: last(std::integral_constant<size_t, 3>{}); break;
    case 2: last(std::integral_constant<size_t, 2>{}); break;
    case 1: last(std::integral_constant<size_t, 1>{}); break;
    default: break;
  }
}

// y[:, begin:end] = 0, before the chunks' sums are added.
template <typename W>
inline void zero_rows(const LinearArgs<W>& a, size_t begin, size_t end) {
  for (size_t mi = 0; mi < a.m; ++mi) std::fill(a.y + mi * a.n + begin, a.y + mi * a.n + end, 0.0f);
}

// y[:, begin:end] times the rows' scales where there are some (int8 weights).
template <typename W>
inline void apply_scale(const LinearArgs<W>& a, size_t begin, size_t end) {
  if (a.scale == nullptr) return;
  for (size_t mi = 0; mi < a.m; ++mi) {
    for (size_t row = begin; row < end; ++row) a.y[mi * a.n + row] *= a.scale[row];
  }
}

// Output row `row` (a column of y) for every row of x: chunk by chunk, the rows of x kRowsOfX at a time, so that
// each chunk of weights is read from memory once and widened once per kRowsOfX rows of x; then times the row's
// scale where there is one (int8 weights).
template <class Path, typename W>
inline void output_row(const LinearArgs<W>& a, size_t row) {
  zero_rows(a, row, row + 1);
  for (size_t c0 = 0; c0 < a.k; c0 += kChunk) {
    const size_t len = std::min(kChunk, a.k - c0);
    passes_over_x(a.m, [&](auto rows, auto prefetch, size_t mi) {
      const W* w = a.w + row * a.k + c0;
      add_dots<Path, 1, decltype(rows)::value, decltype(prefetch)::value>(a, w, a.k, row, mi, c0, len);
    });
  }
  apply_scale(a, row, row + 1);
}

// With a batch of 16 rows of x or more: rows [begin, end) of y, chunk by chunk, and within a chunk the rows of x 4 at
// a time against every row of W of the task (Path::kRows at a time), so that the rows of x of a pass stay in L1 while
// the task's weights come from L2 (a task's weights are 64 KB; a chunk of 32 rows of x is 64 KB, more than L1). Each
// element of y gets the same chunk sums in the same order as in output_row, so the results are the row-by-row ones.
template <class Path, size_t kRows, size_t kM, bool kPrefetch, typename V, typename W>
inline void chunk_pass(const LinearArgs<W>& a, const V* w, size_t ldw, size_t begin, size_t end, size_t mi, size_t c0,
                       size_t len) {
  size_t row = begin;
  for (; row + kRows <= end; row += kRows) {
    add_dots<Path, kRows, kM, kPrefetch>(a, w + (row - begin) * ldw, ldw, row, mi, c0, len);
  }
  for (; row < end; ++row) add_dots<Path, 1, kM, kPrefetch>(a, w + (row - begin) * ldw, ldw, row, mi, c0, len);
}

template <class Path, typename W>
inline void chunk_major(const LinearArgs<W>& a, size_t begin, size_t end) {
  zero_rows(a, begin, end);
  for (size_t c0 = 0; c0 < a.k; c0 += kChunk) {
    const size_t len = std::min(kChunk, a.k - c0);
    passes_over_x(a.m, [&](auto rows, auto prefetch, size_t mi) {
      chunk_pass<Path, Path::kRows, decltype(rows)::value, decltype(prefetch)::value>(a, a.w + begin * a.k + c0, a.k,
                                                                                      begin, end, mi, c0, len);
    });
  }
  apply_scale(a, begin, end);
}

// With a batch of kPackedFrom rows of x or more, float16 or int8 weights and AVX-512 (Path::kPackedRows != 0): rows
// [begin, end) of y, kPackRows rows of W at a time. Each chunk of those rows is widened once into a float32 block on
// the stack (30 KB, in L1), and every row of x then runs the float32 loops against it, 4 rows of x and 3 rows of the
// block a call (24 accumulators). chunk_major widens each weight once per 4 rows of x and takes 2 weight rows a call;
// at 16 and 32 rows of x that made it slower than onnxruntime's float32 MatMul (BENCHMARKS.md section 8). Widening is
// exact and the float32 loops add the same products in the same order, so every element of y gets the same chunk
// sums in the same order as in output_row: the results are the row-by-row ones. (With AVX2's 16 registers, one
// weight row a call, a packed block was slower: each load of x serves a single row.)
constexpr size_t kPackRows = 15;  // a multiple of Avx512::kPackedRows
constexpr size_t kPackedFrom = 16;

template <class Path, typename W>
inline void packed_major(const LinearArgs<W>& a, size_t begin, size_t end) {
  alignas(64) float block[kPackRows * kChunk];
  zero_rows(a, begin, end);
  for (size_t r0 = begin; r0 < end; r0 += kPackRows) {
    const size_t r1 = std::min(end, r0 + kPackRows);
    for (size_t c0 = 0; c0 < a.k; c0 += kChunk) {
      const size_t len = std::min(kChunk, a.k - c0);
      for (size_t row = r0; row < r1; ++row) Path::widen_run(a.w + row * a.k + c0, block + (row - r0) * kChunk, len);
      passes_over_x(a.m, [&](auto rows, auto, size_t mi) {
        chunk_pass<Path, Path::kPackedRows, decltype(rows)::value, false>(a, static_cast<const float*>(block), kChunk,
                                                                          r0, r1, mi, c0, len);
      });
    }
  }
  apply_scale(a, begin, end);
}

size_t task_rows(size_t k, size_t weight_bytes) {
  const size_t rows = kTaskBytes / (k * weight_bytes);
  return std::max(kTaskRowMultiple, (rows + kTaskRowMultiple - 1) / kTaskRowMultiple * kTaskRowMultiple);
}

// The task's block of output rows, then (when y_f16 is set) the same block of y rounded to float16.
template <class Path, typename W>
inline void rows_of_task(const LinearArgs<W>& a, size_t task) {
  const size_t per_task = task_rows(a.k, sizeof(W));
  const size_t begin = task * per_task, end = std::min(a.n, (task + 1) * per_task);
  bool packed = false;
  if constexpr (Path::kPackedRows != 0 && !std::is_same<W, float>::value) {
    packed = a.m >= kPackedFrom;
    if (packed) packed_major<Path>(a, begin, end);
  }
  if (packed) {
  } else if (a.m >= 4 * kRowsOfX) {
    chunk_major<Path>(a, begin, end);
  } else {  // one weight row after the other: a single sequential stream, which reads memory fastest
    for (size_t row = begin; row < end; ++row) output_row<Path>(a, row);
  }
  if (a.y_f16 == nullptr) return;
  for (size_t mi = 0; mi < a.m; ++mi) {
    const float* y = a.y + mi * a.n;
    half_t* rounded = a.y_f16 + mi * a.n;
    for (size_t row = begin; row < end; ++row) rounded[row] = vec::from_float<half_t>(y[row]);
  }
}

MAMBA_CLONES void portable_f16(const LinearArgs<half_t>& a, size_t task) { rows_of_task<Portable>(a, task); }
MAMBA_CLONES void portable_f32(const LinearArgs<float>& a, size_t task) { rows_of_task<Portable>(a, task); }
MAMBA_CLONES void portable_i8(const LinearArgs<int8_t>& a, size_t task) { rows_of_task<Portable>(a, task); }
inline void linear_portable(const LinearArgs<half_t>& a, size_t task) { portable_f16(a, task); }
inline void linear_portable(const LinearArgs<float>& a, size_t task) { portable_f32(a, task); }
inline void linear_portable(const LinearArgs<int8_t>& a, size_t task) { portable_i8(a, task); }

#if MAMBA_LINEAR_F16C
__attribute__((target("avx2,fma,f16c"), flatten)) void linear_f16c(const LinearArgs<half_t>& a, size_t task) {
  rows_of_task<F16c>(a, task);
}
__attribute__((target("avx2,fma,f16c"), flatten)) void linear_f16c(const LinearArgs<float>& a, size_t task) {
  rows_of_task<F16c>(a, task);
}
__attribute__((target("avx2,fma,f16c"), flatten)) void linear_f16c(const LinearArgs<int8_t>& a, size_t task) {
  rows_of_task<F16c>(a, task);
}

#if MAMBA_LINEAR_AVX512
__attribute__((target("avx512f,avx2,fma,f16c"), flatten)) void linear_avx512(const LinearArgs<half_t>& a,
                                                                             size_t task) {
  rows_of_task<Avx512>(a, task);
}
__attribute__((target("avx512f,avx2,fma,f16c"), flatten)) void linear_avx512(const LinearArgs<float>& a,
                                                                             size_t task) {
  rows_of_task<Avx512>(a, task);
}
__attribute__((target("avx512f,avx2,fma,f16c"), flatten)) void linear_avx512(const LinearArgs<int8_t>& a,
                                                                             size_t task) {
  rows_of_task<Avx512>(a, task);
}

bool cpu_has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

bool cpu_has_f16c() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

}  // namespace

template <typename W>
size_t linear_num_tasks(size_t n, size_t k) {
  const size_t per_task = task_rows(k, sizeof(W));
  return (n + per_task - 1) / per_task;
}

template <typename W>
void linear_task(const LinearArgs<W>& args, size_t task) {
#if MAMBA_LINEAR_AVX512
  if (cpu_has_avx512()) {
    linear_avx512(args, task);
    return;
  }
#endif
#if MAMBA_LINEAR_F16C
  if (cpu_has_f16c()) {
    linear_f16c(args, task);
    return;
  }
#endif
  linear_portable(args, task);
}

template size_t linear_num_tasks<float>(size_t n, size_t k);
template size_t linear_num_tasks<half_t>(size_t n, size_t k);
template size_t linear_num_tasks<int8_t>(size_t n, size_t k);
template void linear_task<float>(const LinearArgs<float>& args, size_t task);
template void linear_task<half_t>(const LinearArgs<half_t>& args, size_t task);
template void linear_task<int8_t>(const LinearArgs<int8_t>& args, size_t task);

}  // namespace mamba_export_ops
