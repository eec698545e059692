// RMSNorm and AddRMSNorm on the CPU (see cpu_kernels.h): per row, one pass that (for AddRMSNorm) adds and rounds the
// residual and sums the squares, then one pass that scales by 1 / sqrt(mean + epsilon) and the weight. Both passes
// are loops over the row's d values, vectorised (float16 values converted on load, rounded to nearest-even on store).
#include <algorithm>
#include <cmath>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

// Elements per task when the rows are shared between threads: about 10 microseconds of work, well above what a
// hand-off to the pool costs. A decode step's (1, 1, d) row, or a small batch of them, stays one inline task.
constexpr size_t kTaskElements = 32768;

template <typename R, typename T, bool kAdd>
void norm_rows(const RmsNormArgs<R, T>& a, size_t begin, size_t end) {
  const size_t d = a.d;
  const T* __restrict weight = a.weight;
  for (size_t row = begin; row < end; ++row) {
    const R* __restrict in = a.residual + (a.residual_broadcast ? 0 : row * d);
    const R* __restrict src = in;  // the values normalised: the input, or AddRMSNorm's rounded sum
    float squares = 0.0f;
    if constexpr (kAdd) {
      const T* __restrict x = a.x + row * d;
      R* __restrict sum = a.residual_out + row * d;
#pragma omp simd reduction(+ : squares)
      for (size_t i = 0; i < d; ++i) {
        const R rounded = vec::from_float<R>(vec::to_float(in[i]) + vec::to_float(x[i]));
        sum[i] = rounded;
        const float v = vec::to_float(rounded);
        squares += v * v;
      }
      src = sum;
    } else {
#pragma omp simd reduction(+ : squares)
      for (size_t i = 0; i < d; ++i) {
        const float v = vec::to_float(in[i]);
        squares += v * v;
      }
    }
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(d) + a.epsilon);
    T* __restrict y = a.y + row * d;
#pragma omp simd
    for (size_t i = 0; i < d; ++i) y[i] = vec::from_float<T>(vec::to_float(src[i]) * scale * vec::to_float(weight[i]));
  }
}

template <typename R, typename T>
void norm_task(const RmsNormArgs<R, T>& a, size_t task, size_t num_tasks) {
  const size_t begin = a.rows * task / num_tasks, end = a.rows * (task + 1) / num_tasks;
  if (a.x != nullptr) {
    norm_rows<R, T, true>(a, begin, end);
  } else {
    norm_rows<R, T, false>(a, begin, end);
  }
}

MAMBA_CLONES void norm_f32_f32(const RmsNormArgs<float, float>& a, size_t task, size_t n) { norm_task(a, task, n); }
MAMBA_CLONES void norm_f32_f16(const RmsNormArgs<float, half_t>& a, size_t task, size_t n) { norm_task(a, task, n); }
MAMBA_CLONES void norm_f16_f16(const RmsNormArgs<half_t, half_t>& a, size_t task, size_t n) { norm_task(a, task, n); }

}  // namespace

size_t rms_norm_num_tasks(size_t rows, size_t d) {
  return std::max<size_t>(1, std::min(rows, rows * d / kTaskElements));
}

template <>
void rms_norm_task<float, float>(const RmsNormArgs<float, float>& args, size_t task, size_t num_tasks) {
  norm_f32_f32(args, task, num_tasks);
}

template <>
void rms_norm_task<float, half_t>(const RmsNormArgs<float, half_t>& args, size_t task, size_t num_tasks) {
  norm_f32_f16(args, task, num_tasks);
}

template <>
void rms_norm_task<half_t, half_t>(const RmsNormArgs<half_t, half_t>& args, size_t task, size_t num_tasks) {
  norm_f16_f16(args, task, num_tasks);
}

}  // namespace mamba_export_ops
