// What the fused decode kernels (DecodeBlock, DecodeHead) share: intermediates held in the call's scratch in T and
// widened to float32 for the linear kernel, which takes float32 activations. With T = float16 a value is widened once
// per call instead of once per output row of a product, and the product is summed into float32 scratch that each task
// rounds to float16 for its own block of outputs; with T = float32 the widened and the T buffers are the same.
#pragma once

#include <type_traits>

#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace fused {

template <typename T>
inline constexpr bool kIsFloat = std::is_same_v<T, float>;

// Hands out the regions of a scratch buffer, in floats from its start, each starting on a cache line.
class ScratchLayout {
 public:
  size_t take(size_t floats) {
    const size_t start = total_;
    total_ += round_to_line(floats);
    return start;
  }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};

// The T view of a value held at float32 offset `f32` and, for float16, at offset `t` (half its floats suffice).
template <typename T>
T* t_buffer(float* scratch, size_t f32, size_t t) {
  if constexpr (kIsFloat<T>) {
    return scratch + f32;
  } else {
    return reinterpret_cast<T*>(scratch + t);
  }
}

// Rows [begin, end) of `width` values widened into float32 (nothing to do for float32: the buffers are the same).
template <typename T>
void widen_rows(const T* from, float* to, size_t width, size_t begin, size_t end) {
  if constexpr (!kIsFloat<T>) {
    for (size_t i = begin * width; i < end * width; ++i) to[i] = vec::to_float(from[i]);
  }
}

// y = x W^T for m rows: into `y` when T is float32, else into float32 scratch `y32` rounded into `y`.
template <typename T>
LinearArgs<T> linear_args(const float* x, const T* w, T* y, float* y32, size_t m, size_t n, size_t k) {
  if constexpr (kIsFloat<T>) {
    return {x, w, y, m, n, k};
  } else {
    return {x, w, y32, m, n, k, y};
  }
}

// The norm's task of `num_tasks` (its rows into norm.y, in T), then the same rows widened into h32.
template <typename R, typename T>
void norm_and_widen(const RmsNormArgs<R, T>& norm, float* h32, size_t task, size_t num_tasks) {
  rms_norm_task(norm, task, num_tasks);
  widen_rows(norm.y, h32, norm.d, norm.rows * task / num_tasks, norm.rows * (task + 1) / num_tasks);
}

}  // namespace fused
}  // namespace mamba_export_ops

// The (residual R, activation T) pairs that DecodeBlock's and DecodeHead's CPU kernels are instantiated for (the same
// pairs ort/cpu_ops.cpp registers): X(R, T) for each.
#define MAMBA_FUSED_DECODE_PAIRS(X) X(float, float) X(float, half_t) X(half_t, half_t)
