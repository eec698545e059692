// DecodeHead on the CPU (see cpu_kernels.h): the final norm and the LM head of a decode step as the existing kernels
// run them, rms_norm_task then linear_task, with h and the norm's unused residual_out in the call's scratch: h is
// bit for bit the library's AddRMSNorm output, the logits float32 sums rounded once to T. The head is the step's
// largest matrix (V ~ 50k rows): linear_task splits its rows into tasks of about 64 KiB of weights, each read from
// memory once per call whatever the batch.
#include "fused_decode.h"
#include "mamba_export_ops/cpu_kernels.h"

namespace mamba_export_ops {
namespace {

using fused::t_buffer;

// Where each intermediate lives in the scratch (fused_decode.h); logits32 only when T is float16 (float32 logits are
// summed into the output itself).
struct Layout {
  size_t h32, h_t, residual_out, logits32, total;
};

template <typename T>
Layout layout_of(size_t b, size_t d, size_t v) {
  fused::ScratchLayout s;
  Layout l{};
  l.h32 = s.take(b * d);
  l.h_t = s.take(b * d);
  l.residual_out = s.take(b * d);  // R values: at most one float each
  l.logits32 = s.take(fused::kIsFloat<T> ? 0 : b * v);
  l.total = s.total();
  return l;
}

template <typename R, typename T>
RmsNormArgs<R, T> norm_args(const DecodeHeadArgs<R, T>& a, const Layout& l) {
  return {a.x, a.residual, a.norm_weight, a.epsilon, t_buffer<T>(a.scratch, l.h32, l.h_t),
          reinterpret_cast<R*>(a.scratch + l.residual_out), a.b, a.d};
}

}  // namespace

template <typename T>
size_t decode_head_scratch_floats(size_t b, size_t d, size_t v) {
  return layout_of<T>(b, d, v).total;
}

template <typename R, typename T>
size_t decode_head_num_tasks(const DecodeHeadArgs<R, T>& a, int phase) {
  switch (phase) {
    case 0: return rms_norm_num_tasks(a.b, a.d);
    case 1: return linear_num_tasks<T>(a.v, a.d);
    default: return 0;
  }
}

template <typename R, typename T>
void decode_head_task(const DecodeHeadArgs<R, T>& a, int phase, size_t task) {
  const Layout l = layout_of<T>(a.b, a.d, a.v);
  float* s = a.scratch;
  switch (phase) {
    case 0:
      fused::norm_and_widen(norm_args(a, l), s + l.h32, task, rms_norm_num_tasks(a.b, a.d));
      break;
    case 1:
      linear_task(fused::linear_args(s + l.h32, a.weight, a.logits, s + l.logits32, a.b, a.v, a.d), task);
      break;
    default:
      break;
  }
}

template size_t decode_head_scratch_floats<float>(size_t b, size_t d, size_t v);
template size_t decode_head_scratch_floats<half_t>(size_t b, size_t d, size_t v);
#define MAMBA_DECODE_HEAD_INSTANCE(R, T)                                                      \
  template size_t decode_head_num_tasks<R, T>(const DecodeHeadArgs<R, T>& args, int phase);   \
  template void decode_head_task<R, T>(const DecodeHeadArgs<R, T>& args, int phase, size_t task);
MAMBA_FUSED_DECODE_PAIRS(MAMBA_DECODE_HEAD_INSTANCE)
#undef MAMBA_DECODE_HEAD_INSTANCE

}  // namespace mamba_export_ops
