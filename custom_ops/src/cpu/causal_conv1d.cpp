// CausalConv1d on the CPU: y_t = act(bias + sum_j weight[:, j] * x_{t-k+1+j}), continuing from the conv state.
//
// A task owns one batch row and a block of kChannelBlock channels. It keeps the last k inputs transposed, in a ring
// of k rows of one block each (the first k-1 start as the conv state), so the loops over channels are the vectorised
// ones. After the sequence the ring holds the new conv state, also when l < k-1.
#include <algorithm>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "prefetch.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

constexpr size_t CB = kChannelBlock;

// Input index i (i < 0: the conv state) lives in window slot (i + k) mod k: a ring, so no time step moves data.
inline size_t slot(long long i, size_t k) { return static_cast<size_t>((i + static_cast<long long>(k)) % k); }

template <typename T>
void conv_block(const CausalConv1dArgs<T>& a, size_t task) {
  const size_t blocks = (a.e + CB - 1) / CB;
  const size_t bi = task / blocks, c0 = (task % blocks) * CB, cb = std::min(CB, a.e - c0), k = a.k;
  const long long km1 = static_cast<long long>(k) - 1;
  float* win = a.scratch + task * causal_conv1d_scratch_floats(k);  // [k][CB] ring of the last k inputs
  float* wt = win + k * CB;                                          // [k][CB] weight, transposed
  float* acc = wt + k * CB;                                          // [CB]
  const float* state_in = a.state_in + (bi * a.e + c0) * (k - 1);
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j < k; ++j) wt[j * CB + c] = a.weight[(c0 + c) * k + j];
    for (size_t j = 0; j + 1 < k; ++j) win[slot(static_cast<long long>(j) - km1, k) * CB + c] = state_in[c * (k - 1) + j];
  }
  for (size_t t = 0; t < a.l; ++t) {
    const size_t row = (bi * a.l + t) * a.e + c0;
    if (t + kPrefetchSteps < a.l) prefetch_slice(a.x + row + kPrefetchSteps * a.e, cb);
    float* newest = win + slot(static_cast<long long>(t), k) * CB;
#pragma omp simd
    for (size_t c = 0; c < cb; ++c) {
      newest[c] = vec::to_float(a.x[row + c]);
      acc[c] = a.bias[c0 + c];
    }
    for (size_t j = 0; j < k; ++j) {  // tap j reads input t - (k-1) + j
      const float* in = win + slot(static_cast<long long>(t + j) - km1, k) * CB;
      const float* w = wt + j * CB;
#pragma omp simd
      for (size_t c = 0; c < cb; ++c) acc[c] += w[c] * in[c];
    }
#pragma omp simd
    for (size_t c = 0; c < cb; ++c) a.y[row + c] = vec::from_float<T>(a.silu ? vec::silu(acc[c]) : acc[c]);
  }
  float* state_out = a.state_out + (bi * a.e + c0) * (k - 1);
  const long long l = static_cast<long long>(a.l);
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j + 1 < k; ++j) state_out[c * (k - 1) + j] = win[slot(l - km1 + static_cast<long long>(j), k) * CB + c];
  }
}

MAMBA_CLONES void conv_block_f32(const CausalConv1dArgs<float>& a, size_t task) { conv_block(a, task); }
MAMBA_CLONES void conv_block_f16(const CausalConv1dArgs<half_t>& a, size_t task) { conv_block(a, task); }

}  // namespace

size_t causal_conv1d_num_tasks(size_t b, size_t e) { return b * ((e + CB - 1) / CB); }

size_t causal_conv1d_scratch_floats(size_t k) { return round_to_line(2 * k * CB + CB); }

template <>
void causal_conv1d_task<float>(const CausalConv1dArgs<float>& args, size_t task) {
  conv_block_f32(args, task);
}

template <>
void causal_conv1d_task<half_t>(const CausalConv1dArgs<half_t>& args, size_t task) {
  conv_block_f16(args, task);
}

}  // namespace mamba_export_ops
