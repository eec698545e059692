// CausalConv1d on the CPU: y_t = act(bias + sum_j weight[:, j] * x_{t-k+1+j}), continuing from the conv state.
//
// A task owns one batch row and a block of kChannelBlock channels. It keeps a window of the last k inputs,
// transposed ([k][block], oldest first; the first k-1 rows start as the conv state), so the loops over channels are
// the vectorised ones. After the sequence the window's last k-1 rows are the new conv state, also when l < k-1.
#include <algorithm>
#include <cstring>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

constexpr size_t CB = kChannelBlock;

template <typename T>
void conv_block(const CausalConv1dArgs<T>& a, size_t task) {
  const size_t blocks = (a.e + CB - 1) / CB;
  const size_t bi = task / blocks, c0 = (task % blocks) * CB, cb = std::min(CB, a.e - c0), k = a.k;
  float* win = a.scratch + task * causal_conv1d_scratch_floats(k);  // [k][CB]
  float* wt = win + k * CB;                                          // [k][CB] weight, transposed
  float* acc = wt + k * CB;                                          // [CB]
  const float* state_in = a.state_in + (bi * a.e + c0) * (k - 1);
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j < k; ++j) wt[j * CB + c] = a.weight[(c0 + c) * k + j];
    for (size_t j = 0; j + 1 < k; ++j) win[j * CB + c] = state_in[c * (k - 1) + j];
  }
  float* newest = win + (k - 1) * CB;
  for (size_t t = 0; t < a.l; ++t) {
    const size_t row = (bi * a.l + t) * a.e + c0;
#pragma omp simd
    for (size_t c = 0; c < cb; ++c) {
      newest[c] = vec::to_float(a.x[row + c]);
      acc[c] = a.bias[c0 + c];
    }
    for (size_t j = 0; j < k; ++j) {
#pragma omp simd
      for (size_t c = 0; c < cb; ++c) acc[c] += wt[j * CB + c] * win[j * CB + c];
    }
#pragma omp simd
    for (size_t c = 0; c < cb; ++c) a.y[row + c] = vec::from_float<T>(a.silu ? vec::silu(acc[c]) : acc[c]);
    std::memmove(win, win + CB, (k - 1) * CB * sizeof(float));
  }
  float* state_out = a.state_out + (bi * a.e + c0) * (k - 1);
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j + 1 < k; ++j) state_out[c * (k - 1) + j] = win[j * CB + c];
  }
}

MAMBA_CLONES void conv_block_f32(const CausalConv1dArgs<float>& a, size_t task) { conv_block(a, task); }
MAMBA_CLONES void conv_block_f16(const CausalConv1dArgs<half_t>& a, size_t task) { conv_block(a, task); }

}  // namespace

size_t causal_conv1d_num_tasks(size_t b, size_t e) { return b * ((e + CB - 1) / CB); }

size_t causal_conv1d_scratch_floats(size_t k) { return 2 * k * CB + CB; }

template <>
void causal_conv1d_task<float>(const CausalConv1dArgs<float>& args, size_t task) {
  conv_block_f32(args, task);
}

template <>
void causal_conv1d_task<half_t>(const CausalConv1dArgs<half_t>& args, size_t task) {
  conv_block_f16(args, task);
}

}  // namespace mamba_export_ops
