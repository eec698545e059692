// CPU kernels of the ai.mamba_export ops, independent of onnxruntime.
//
// They take plain pointers and sizes, allocate nothing and never throw: the onnxruntime binding (src/ort/) validates
// shapes and dtypes, allocates outputs and scratch, and runs the tasks on the session's thread pool.
// Work is split into independent tasks (a batch row times a block of channels); run every task index in
// [0, num_tasks) exactly once, in any order and on any thread.
//
// Layout (docs/CONTRACTS.md): activations channels-last [b, l, e]; states [b, e, n] and [b, e, k-1]; all state
// arithmetic in float32. Symbols: b batch, l tokens, e channels (d_inner), n d_state, k d_conv, r dt_rank,
// d d_model (the norms' width).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mamba_export_ops {

// IEEE binary16 storage (same bits as onnxruntime's Float16_t); converted to float32 for all arithmetic.
struct half_t {
  uint16_t bits;
};

// Channels per task in the prefill kernels: the inner loops are vectorised over this block.
constexpr size_t kChannelBlock = 64;

// Scratch memory must start on a 64-byte cache line; every task's share is a whole number of lines (kLineFloats),
// so tasks on different threads never write to the same line.
constexpr size_t kLineFloats = 16;

inline size_t round_to_line(size_t floats) { return (floats + kLineFloats - 1) / kLineFloats * kLineFloats; }

template <typename T>
struct SelectiveScanArgs {
  const T* u;                  // [b, l, e]
  const T* delta;              // [b, l, e], before bias and softplus
  const float* A;              // [e, n]
  const T* B;                  // [b, l, n]
  const T* C;                  // [b, l, n]
  const float* D;              // [e]
  const T* z;                  // [b, l, e]
  const float* delta_bias;     // [e]
  const float* state_in;       // [b, e, n]
  bool delta_softplus;
  T* y;                        // [b, l, e]
  float* state_out;            // [b, e, n]
  size_t b, l, e, n;
  float* scratch;              // num_tasks * selective_scan_scratch_floats(n)
};

size_t selective_scan_num_tasks(size_t b, size_t e);
size_t selective_scan_scratch_floats(size_t n);  // per task
template <typename T>
void selective_scan_task(const SelectiveScanArgs<T>& args, size_t task);

template <typename T>
struct CausalConv1dArgs {
  const T* x;                  // [b, l, e]
  const float* state_in;       // [b, e, k-1]
  const float* weight;         // [e, k]
  const float* bias;           // [e]
  bool silu;
  T* y;                        // [b, l, e]
  float* state_out;            // [b, e, k-1]
  size_t b, l, e, k;
  float* scratch;              // num_tasks * causal_conv1d_scratch_floats(k)
};

size_t causal_conv1d_num_tasks(size_t b, size_t e);
size_t causal_conv1d_scratch_floats(size_t k);  // per task
template <typename T>
void causal_conv1d_task(const CausalConv1dArgs<T>& args, size_t task);

// DecodeStep runs in three phases, each a set of tasks; a phase may start only when the previous one has finished:
//   1. conv-state shift + conv + SiLU per channel, into x_conv;
//   2. x_proj: x_dbl = x_proj_weight @ x_conv (a reduction over all channels, hence the barrier);
//   3. dt_proj + softplus, SSM state update, output and gate per channel.
template <typename T>
struct DecodeStepArgs {
  const T* xz;                 // [b, 1, 2e]: x then z
  const float* conv_state_in;  // [b, e, k-1]
  const float* ssm_state_in;   // [b, e, n]
  const float* conv_weight;    // [e, k]
  const float* conv_bias;      // [e]
  const float* x_proj_weight;  // [r + 2n, e], rows dt, B, C
  const float* dt_proj_weight; // [e, r]
  const float* dt_bias;        // [e]
  const float* A;              // [e, n]
  const float* D;              // [e]
  T* y;                        // [b, 1, e]
  float* conv_state_out;       // [b, e, k-1]
  float* ssm_state_out;        // [b, e, n]
  size_t b, e, n, k, r;
  float* x_conv;               // scratch [b, e]
  float* x_dbl;                // scratch [b, r + 2n], starting on a line of its own
};

size_t decode_step_num_tasks(int phase, size_t b, size_t e, size_t n, size_t r);
template <typename T>
void decode_step_task(const DecodeStepArgs<T>& args, int phase, size_t task);

// RMSNorm and AddRMSNorm over rows of d values (the b * l positions of [b, l, d] tensors), float32 arithmetic.
// R is the residual stream's type (float32, or T), T the type of the weight and of y.
//   RMSNorm    (x == nullptr):  y = T(r / sqrt(mean(r^2) + epsilon) * weight) with r = float32(residual);
//   AddRMSNorm (x != nullptr):  residual_out = R(float32(residual) + float32(x)), then y as above from the ROUNDED
//                               residual_out (what the reference model normalises when R is float16).
// A task owns a contiguous run of rows; rms_norm_num_tasks is 1 when the work is too small to be worth sharing
// between threads (then run task 0 inline).
template <typename R, typename T>
struct RmsNormArgs {
  const T* x;                  // [rows, d] AddRMSNorm's x (a block's output); nullptr for RMSNorm
  const R* residual;           // [rows, d] RMSNorm's x; AddRMSNorm's residual
  const T* weight;             // [d]
  float epsilon;
  T* y;                        // [rows, d]
  R* residual_out;             // [rows, d] AddRMSNorm only (nullptr for RMSNorm)
  size_t rows, d;
  bool residual_broadcast = false;  // AddRMSNorm: residual is one row [1, d], added to every row (DecodeBlock)
};

size_t rms_norm_num_tasks(size_t rows, size_t d);
template <typename R, typename T>
void rms_norm_task(const RmsNormArgs<R, T>& args, size_t task, size_t num_tasks);

// A linear layer y = x W^T (LinearF16W, LinearI8W, the projections of DecodeBlock, the LM head of DecodeHead):
// float32 x, weights W float32, float16 or int8 (widened to float32 in registers), float32 sums; with `scale` set (int8
// weights) each output row's sum is then multiplied by scale[row]. The m rows of x (the product of x's
// leading dimensions) all go through each task, so every weight is read from memory once per call. A task owns a
// contiguous block of output rows (columns of y); with y_f16 set it also writes that block of y rounded to float16
// (y then is scratch).
template <typename W>
struct LinearArgs {
  const float* x;              // [m, k]
  const W* w;                  // [n, k]: each output's weights contiguous
  float* y;                    // [m, n]
  size_t m, n, k;
  half_t* y_f16 = nullptr;     // [m, n] or nullptr
  const float* scale = nullptr;  // [n] or nullptr
};
using LinearF16WArgs = LinearArgs<half_t>;
using LinearI8WArgs = LinearArgs<int8_t>;

template <typename W>
size_t linear_num_tasks(size_t n, size_t k);
template <typename W>
void linear_task(const LinearArgs<W>& args, size_t task);

// DecodeBlock: one whole decode layer, AddRMSNorm -> in_proj -> DecodeStep -> out_proj, with the semantics of those
// ops (docs/CONTRACTS.md): h = AddRMSNorm(x, residual) in T; xz = T(h in_proj^T), y = DecodeStep(xz) in T,
// out = T(y out_proj^T), both products summed in float32. It runs in kDecodeBlockPhases phases, each a set of tasks
// that may start only when the previous phase has finished:
//   0. AddRMSNorm of every batch row, h widened to float32;   1. in_proj;
//   2-4. DecodeStep's three phases;                           5. y widened to float32;   6. out_proj.
template <typename R, typename T>
struct DecodeBlockArgs {
  const T* x;                  // [b, 1, d]
  const R* residual;           // [b, 1, d], or [1, 1, d] with residual_broadcast
  const T* norm_weight;        // [d]
  const T* in_proj_weight;     // [2e, d]
  const float* conv_state_in;  // [b, e, k-1]
  const float* ssm_state_in;   // [b, e, n]
  const float* conv_weight;    // [e, k]
  const float* conv_bias;      // [e]
  const float* x_proj_weight;  // [r + 2n, e]
  const float* dt_proj_weight; // [e, r]
  const float* dt_bias;        // [e]
  const float* A;              // [e, n]
  const float* D;              // [e]
  const T* out_proj_weight;    // [d, e]
  float epsilon;
  T* out;                      // [b, 1, d]
  R* residual_out;             // [b, 1, d]
  float* conv_state_out;       // [b, e, k-1]
  float* ssm_state_out;        // [b, e, n]
  size_t b, d, e, n, k, r;
  float* scratch;              // decode_block_scratch_floats(b, d, e, n, r), on a cache line
  bool residual_broadcast = false;  // residual is one row for every sequence (layer 0's zero residual)
};

constexpr int kDecodeBlockPhases = 7;
size_t decode_block_scratch_floats(size_t b, size_t d, size_t e, size_t n, size_t r);
template <typename R, typename T>
size_t decode_block_num_tasks(const DecodeBlockArgs<R, T>& args, int phase);
template <typename R, typename T>
void decode_block_task(const DecodeBlockArgs<R, T>& args, int phase, size_t task);

// DecodeHead: the tail of a decode step, the final AddRMSNorm and the LM head, with the semantics of those ops
// (docs/CONTRACTS.md): h = AddRMSNorm(x, residual) in T (its residual_out stays in scratch); logits = T(h weight^T)
// summed in float32. Two phases, the second to start when the first has finished:
//   0. AddRMSNorm of every batch row, h widened to float32;   1. the LM head, the V rows of weight split over tasks.
template <typename R, typename T>
struct DecodeHeadArgs {
  const T* x;                  // [b, 1, d]
  const R* residual;           // [b, 1, d]
  const T* norm_weight;        // [d]
  const T* weight;             // [V, d]: each vocabulary entry's row contiguous (nn.Linear layout)
  float epsilon;
  T* logits;                   // [b, 1, V]
  size_t b, d, v;
  float* scratch;              // decode_head_scratch_floats<T>(b, d, v), on a cache line
};

constexpr int kDecodeHeadPhases = 2;
template <typename T>
size_t decode_head_scratch_floats(size_t b, size_t d, size_t v);
template <typename R, typename T>
size_t decode_head_num_tasks(const DecodeHeadArgs<R, T>& args, int phase);
template <typename R, typename T>
void decode_head_task(const DecodeHeadArgs<R, T>& args, int phase, size_t task);

}  // namespace mamba_export_ops
