// DecodeStep on the CPU: one token of a Mamba mixer between in_proj and out_proj (MambaMixer.step), in three
// phases (see cpu_kernels.h). Phases 1 and 3 split the channels of each batch row into blocks; phase 2 splits the
// rows of x_proj. A single token has no time axis to vectorise over, so the loops run over channels, the
// reduction axes (e, r) or the state (n).
#include <algorithm>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

constexpr size_t kDecodeChannels = 256;  // channels per task in phases 1 and 3
constexpr size_t kDecodeRows = 16;       // x_proj rows per task in phase 2

size_t blocks_of(size_t total, size_t block) { return (total + block - 1) / block; }

// Phase 1: shift the conv state, convolve, SiLU.
template <typename T>
void conv_phase(const DecodeStepArgs<T>& a, size_t task) {
  const size_t blocks = blocks_of(a.e, kDecodeChannels), bi = task / blocks, k = a.k;
  const size_t c0 = (task % blocks) * kDecodeChannels, c1 = std::min(a.e, c0 + kDecodeChannels);
  const T* x = a.xz + bi * 2 * a.e;
  for (size_t c = c0; c < c1; ++c) {
    const float* w = a.conv_weight + c * k;
    const float* s_in = a.conv_state_in + (bi * a.e + c) * (k - 1);
    float* s_out = a.conv_state_out + (bi * a.e + c) * (k - 1);
    const float xc = vec::to_float(x[c]);
    float acc = a.conv_bias[c] + w[k - 1] * xc;
    for (size_t j = 0; j + 1 < k; ++j) acc += w[j] * s_in[j];
    for (size_t j = 0; j + 2 < k; ++j) s_out[j] = s_in[j + 1];
    if (k > 1) s_out[k - 2] = xc;
    a.x_conv[bi * a.e + c] = vec::silu(acc);
  }
}

inline float dot(const float* __restrict p, const float* __restrict q, size_t len) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (size_t i = 0; i < len; ++i) s += p[i] * q[i];
  return s;
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

// Phase 3: dt = softplus(dt_proj_weight @ x_dbl[:r] + dt_bias); state update; y = (C . h + D x) * silu(z).
template <typename T>
void ssm_phase(const DecodeStepArgs<T>& a, size_t task) {
  const size_t blocks = blocks_of(a.e, kDecodeChannels), bi = task / blocks, n = a.n;
  const size_t c0 = (task % blocks) * kDecodeChannels, c1 = std::min(a.e, c0 + kDecodeChannels);
  const float* x_dbl = a.x_dbl + bi * (a.r + 2 * n);
  const float* B = x_dbl + a.r;
  const float* C = B + n;
  const T* z = a.xz + bi * 2 * a.e + a.e;
  for (size_t c = c0; c < c1; ++c) {
    const float dt = vec::softplus(dot(a.dt_proj_weight + c * a.r, x_dbl, a.r) + a.dt_bias[c]);
    const float x = a.x_conv[bi * a.e + c], dtx = dt * x;
    const float* __restrict A = a.A + c * n;
    const float* __restrict h_in = a.ssm_state_in + (bi * a.e + c) * n;
    float* __restrict h_out = a.ssm_state_out + (bi * a.e + c) * n;
    float y = 0.0f;
#pragma omp simd reduction(+ : y)
    for (size_t j = 0; j < n; ++j) {
      float h = vec::exp(dt * A[j]) * h_in[j] + dtx * B[j];
      h_out[j] = h;
      y += h * C[j];
    }
    a.y[bi * a.e + c] = vec::from_float<T>((y + a.D[c] * x) * vec::silu(vec::to_float(z[c])));
  }
}

template <typename T>
void decode_phase(const DecodeStepArgs<T>& a, int phase, size_t task) {
  if (phase == 1) conv_phase(a, task);
  if (phase == 2) x_proj_phase(a, task);
  if (phase == 3) ssm_phase(a, task);
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
