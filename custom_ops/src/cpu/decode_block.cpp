// DecodeBlock on the CPU (see cpu_kernels.h): one decode layer as the existing kernels run it, phase after phase,
// with every intermediate (h, xz, y) in the call's scratch instead of a tensor of the graph. The projections are
// linear_task (float32 or float16 weights, read once per call whatever the batch); the norm and the mixer are
// rms_norm_task and decode_step_task, so the block computes bit for bit what AddRMSNorm -> MatMul -> DecodeStep ->
// MatMul compute with the library (the MatMuls in float32 sums rounded to T). h and y are widened to float32 for the
// linear kernel in phases 0 and 5 (fused_decode.h).
#include <algorithm>

#include "fused_decode.h"
#include "mamba_export_ops/cpu_kernels.h"

namespace mamba_export_ops {
namespace {

using fused::kIsFloat;
using fused::linear_args;
using fused::t_buffer;

// Where each intermediate lives in the scratch, in floats from its start; every region starts on a cache line.
// A T buffer of float16 values takes half its floats; with T = float32 it is the float32 buffer itself.
struct Layout {
  size_t h32, h_t, xz32, xz_t, x_conv, x_dbl, y_t, y32, out32, total;
};

Layout layout_of(size_t b, size_t d, size_t e, size_t n, size_t r) {
  fused::ScratchLayout s;
  Layout l{};
  l.h32 = s.take(b * d);
  l.h_t = s.take(b * d);
  l.xz32 = s.take(b * 2 * e);
  l.xz_t = s.take(b * 2 * e);
  l.x_conv = s.take(b * e);
  l.x_dbl = s.take(b * (r + 2 * n));
  l.y_t = s.take(b * e);
  l.y32 = s.take(b * e);
  l.out32 = s.take(b * d);
  l.total = s.total();
  return l;
}

// The block's DecodeStep reads xz from, and writes y and its own scratch to, the block's scratch.
template <typename R, typename T>
DecodeStepArgs<T> step_args(const DecodeBlockArgs<R, T>& a, const Layout& l) {
  return {t_buffer<T>(a.scratch, l.xz32, l.xz_t), a.conv_state_in, a.ssm_state_in, a.conv_weight, a.conv_bias,
          a.x_proj_weight, a.dt_proj_weight, a.dt_bias, a.A, a.D, t_buffer<T>(a.scratch, l.y32, l.y_t),
          a.conv_state_out, a.ssm_state_out, a.b, a.e, a.n, a.k, a.r, a.scratch + l.x_conv, a.scratch + l.x_dbl};
}

template <typename R, typename T>
RmsNormArgs<R, T> norm_args(const DecodeBlockArgs<R, T>& a, const Layout& l) {
  return {a.x, a.residual, a.norm_weight, a.epsilon, t_buffer<T>(a.scratch, l.h32, l.h_t), a.residual_out, a.b, a.d,
          a.residual_broadcast};
}

}  // namespace

size_t decode_block_scratch_floats(size_t b, size_t d, size_t e, size_t n, size_t r) {
  return layout_of(b, d, e, n, r).total;
}

template <typename R, typename T>
size_t decode_block_num_tasks(const DecodeBlockArgs<R, T>& a, int phase) {
  switch (phase) {
    case 0: return rms_norm_num_tasks(a.b, a.d);
    case 1: return linear_num_tasks<T>(2 * a.e, a.d);
    case 2: case 3: case 4: return decode_step_num_tasks(phase - 1, a.b, a.e, a.n, a.r);
    case 5: return kIsFloat<T> ? 0 : rms_norm_num_tasks(a.b, a.e);  // the norm's split of rows: inline when small
    case 6: return linear_num_tasks<T>(a.d, a.e);
    default: return 0;
  }
}

template <typename R, typename T>
void decode_block_task(const DecodeBlockArgs<R, T>& a, int phase, size_t task) {
  const Layout l = layout_of(a.b, a.d, a.e, a.n, a.r);
  float* s = a.scratch;
  const size_t tasks = std::max<size_t>(1, decode_block_num_tasks(a, phase));
  switch (phase) {
    case 0:
      fused::norm_and_widen(norm_args(a, l), s + l.h32, task, tasks);
      break;
    case 1:
      linear_task(linear_args(s + l.h32, a.in_proj_weight, t_buffer<T>(s, l.xz32, l.xz_t), s + l.xz32, a.b, 2 * a.e,
                              a.d), task);
      break;
    case 2: case 3: case 4:
      decode_step_task(step_args(a, l), phase - 1, task);
      break;
    case 5:
      fused::widen_rows(t_buffer<T>(s, l.y32, l.y_t), s + l.y32, a.e, a.b * task / tasks, a.b * (task + 1) / tasks);
      break;
    case 6:
      linear_task(linear_args(s + l.y32, a.out_proj_weight, a.out, s + l.out32, a.b, a.d, a.e), task);
      break;
    default:
      break;
  }
}

#define MAMBA_DECODE_BLOCK_INSTANCE(R, T)                                                        \
  template size_t decode_block_num_tasks<R, T>(const DecodeBlockArgs<R, T>& args, int phase);    \
  template void decode_block_task<R, T>(const DecodeBlockArgs<R, T>& args, int phase, size_t task);
MAMBA_FUSED_DECODE_PAIRS(MAMBA_DECODE_BLOCK_INSTANCE)
#undef MAMBA_DECODE_BLOCK_INSTANCE

}  // namespace mamba_export_ops
