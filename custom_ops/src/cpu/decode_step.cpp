// DecodeStep on the CPU: one token of a Mamba mixer between in_proj and out_proj (MambaMixer.step), in three
// phases (see cpu_kernels.h). Phases 1 and 3 split the channels of each batch row into blocks; phase 2 splits the
// rows of x_proj. A single token has no time axis, so each phase works through its channels in groups of kGroup:
// the per-channel reductions (conv taps, dt_proj rows, the state) run channel by channel, and the transcendental
// parts (softplus, SiLU) run vectorised across the group.
#include <algorithm>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

constexpr size_t kDecodeChannels = 256;  // channels per task in phases 1 and 3
constexpr size_t kDecodeRows = 8;        // x_proj rows per task in phase 2 (mamba-130m: 10 tasks)
constexpr size_t kGroup = 64;            // channels per vectorised group inside a task

size_t blocks_of(size_t total, size_t block) { return (total + block - 1) / block; }

inline float dot(const float* __restrict p, const float* __restrict q, size_t len) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (size_t i = 0; i < len; ++i) s += p[i] * q[i];
  return s;
}

// A short dot product (dt_proj rows, length r): 16 running sums of fixed width, so the loop body is one or two
// whole vectors with no remainder handling per row, then one tree reduction; a scalar tail when 16 does not divide len.
inline float short_dot(const float* __restrict p, const float* __restrict q, size_t len) {
  float acc[16] = {};
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
#pragma omp simd
    for (size_t j = 0; j < 16; ++j) acc[j] += p[i + j] * q[i + j];
  }
  float tail = 0.0f;
  for (; i < len; ++i) tail += p[i] * q[i];
  for (size_t w = 8; w >= 1; w /= 2) {
#pragma omp simd
    for (size_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0] + tail;
}

// Phase 1, channels [c0, c0 + g): shift the conv state, convolve, SiLU.
template <typename T>
void conv_group(const DecodeStepArgs<T>& a, size_t bi, size_t c0, size_t g) {
  const size_t k = a.k;
  const T* x = a.xz + bi * 2 * a.e + c0;
  float xs[kGroup], acc[kGroup];
#pragma omp simd
  for (size_t c = 0; c < g; ++c) xs[c] = vec::to_float(x[c]);
  for (size_t c = 0; c < g; ++c) {
    const float* w = a.conv_weight + (c0 + c) * k;
    const float* s_in = a.conv_state_in + (bi * a.e + c0 + c) * (k - 1);
    float* s_out = a.conv_state_out + (bi * a.e + c0 + c) * (k - 1);
    float sum = a.conv_bias[c0 + c] + w[k - 1] * xs[c];
    for (size_t j = 0; j + 1 < k; ++j) sum += w[j] * s_in[j];
    for (size_t j = 0; j + 2 < k; ++j) s_out[j] = s_in[j + 1];
    if (k > 1) s_out[k - 2] = xs[c];
    acc[c] = sum;
  }
  float* out = a.x_conv + bi * a.e + c0;
#pragma omp simd
  for (size_t c = 0; c < g; ++c) out[c] = vec::silu(acc[c]);
}

// Phase 2: x_dbl = x_proj_weight @ x_conv.
template <typename T>
void x_proj_phase(const DecodeStepArgs<T>& a, size_t task) {
  const size_t rows = a.r + 2 * a.n, blocks = blocks_of(rows, kDecodeRows), bi = task / blocks;
  const size_t r0 = (task % blocks) * kDecodeRows, r1 = std::min(rows, r0 + kDecodeRows);
  for (size_t i = r0; i < r1; ++i) {
    a.x_dbl[bi * rows + i] = dot(a.x_proj_weight + i * a.e, a.x_conv + bi * a.e, a.e);
  }
}

// Phase 3, channels [c0, c0 + g): dt = softplus(dt_proj_weight @ x_dbl[:r] + dt_bias); state update;
// y = (C . h + D x) * silu(z). kN is n when it is known at compile time (16, every released Mamba-1 model), else 0:
// with a constant n the per-channel state loop is one or two vectors with no loop or remainder around it.
template <size_t kN, typename T>
void ssm_group_n(const DecodeStepArgs<T>& a, size_t bi, size_t c0, size_t g) {
  const size_t n = kN ? kN : a.n;
  const float* x_dbl = a.x_dbl + bi * (a.r + 2 * n);
  const float* __restrict B = x_dbl + a.r;
  const float* __restrict C = B + n;
  const float* x = a.x_conv + bi * a.e + c0;
  const T* z = a.xz + bi * 2 * a.e + a.e + c0;
  float dt[kGroup], y[kGroup];
  for (size_t c = 0; c < g; ++c) dt[c] = short_dot(a.dt_proj_weight + (c0 + c) * a.r, x_dbl, a.r);
#pragma omp simd
  for (size_t c = 0; c < g; ++c) dt[c] = vec::softplus(dt[c] + a.dt_bias[c0 + c]);
  for (size_t c = 0; c < g; ++c) {
    const float* __restrict A = a.A + (c0 + c) * n;
    const float* __restrict h_in = a.ssm_state_in + (bi * a.e + c0 + c) * n;
    float* __restrict h_out = a.ssm_state_out + (bi * a.e + c0 + c) * n;
    const float d = dt[c], dx = dt[c] * x[c];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < n; ++j) {
      float h = vec::exp(d * A[j]) * h_in[j] + dx * B[j];
      h_out[j] = h;
      sum += h * C[j];
    }
    y[c] = sum;
  }
  T* out = a.y + bi * a.e + c0;
#pragma omp simd
  for (size_t c = 0; c < g; ++c) {
    out[c] = vec::from_float<T>((y[c] + a.D[c0 + c] * x[c]) * vec::silu(vec::to_float(z[c])));
  }
}

template <typename T>
void ssm_group(const DecodeStepArgs<T>& a, size_t bi, size_t c0, size_t g) {
  if (a.n == 16) {
    ssm_group_n<16>(a, bi, c0, g);
  } else {
    ssm_group_n<0>(a, bi, c0, g);
  }
}

// Runs `group(a, bi, c0, g)` over the channel block of a phase 1 or phase 3 task.
template <typename T, typename Group>
void for_channel_groups(const DecodeStepArgs<T>& a, size_t task, Group group) {
  const size_t blocks = blocks_of(a.e, kDecodeChannels), bi = task / blocks;
  const size_t begin = (task % blocks) * kDecodeChannels, end = std::min(a.e, begin + kDecodeChannels);
  for (size_t c0 = begin; c0 < end; c0 += kGroup) group(a, bi, c0, std::min(kGroup, end - c0));
}

template <typename T>
void decode_phase(const DecodeStepArgs<T>& a, int phase, size_t task) {
  if (phase == 1) for_channel_groups(a, task, conv_group<T>);
  if (phase == 2) x_proj_phase(a, task);
  if (phase == 3) for_channel_groups(a, task, ssm_group<T>);
}

MAMBA_CLONES void decode_f32(const DecodeStepArgs<float>& a, int phase, size_t task) { decode_phase(a, phase, task); }
MAMBA_CLONES void decode_f16(const DecodeStepArgs<half_t>& a, int phase, size_t task) { decode_phase(a, phase, task); }

}  // namespace

size_t decode_step_num_tasks(int phase, size_t b, size_t e, size_t n, size_t r) {
  if (phase == 2) return b * blocks_of(r + 2 * n, kDecodeRows);
  return b * blocks_of(e, kDecodeChannels);
}

template <>
void decode_step_task<float>(const DecodeStepArgs<float>& args, int phase, size_t task) {
  decode_f32(args, phase, task);
}

template <>
void decode_step_task<half_t>(const DecodeStepArgs<half_t>& args, int phase, size_t task) {
  decode_f16(args, phase, task);
}

}  // namespace mamba_export_ops
