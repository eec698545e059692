// Launchers of the Mamba-1 CUDA kernels: plain device pointers, sizes and a stream. No onnxruntime here.
//
// Layouts are the custom-op contract's (docs/CONTRACTS.md), all contiguous row-major:
//   activations (T = float32, float16 or bfloat16): u, delta, z, x, y [b, l, e]; B, C [b, l, n]; xz [b, 1, 2e];
//   the norms' x, residual, y [b, l, d] (the residual in R = float32 or T) and weight [d] (T)
//   float32: A [e, n], D, delta_bias, conv bias [e], conv weight [e, k], x_proj weight [r + 2n, e],
//            dt_proj weight [e, r], conv state [b, e, k - 1], ssm state [b, e, n].
// All state arithmetic is float32 whatever T is. Inputs and outputs must not overlap.
// Every launcher returns cudaSuccess or the first CUDA error (launch errors included); it never synchronizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mamba_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

constexpr int64_t kMaxDState = 256;  // largest d_state the scan kernels hold in registers
constexpr int64_t kMaxDConv = 16;    // largest d_conv of the convolutions
constexpr int64_t kMaxDim = int64_t{1} << 30;  // largest d_inner, d_model, dt_rank of the decode ops (32-bit offsets)

// y = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_in) and the final state.
struct SelectiveScanArgs {
  DType dtype;
  int64_t batch, seqlen, dim, dstate;  // b, l, e, n
  bool delta_softplus;
  const void* u;            // [b, l, e] T
  const void* delta;        // [b, l, e] T
  const float* A;           // [e, n]
  const void* B;            // [b, l, n] T
  const void* C;            // [b, l, n] T
  const float* D;           // [e]
  const void* z;            // [b, l, e] T
  const float* delta_bias;  // [e]
  const float* state_in;    // [b, e, n]
  void* y;                  // [b, l, e] T
  float* state_out;         // [b, e, n]
  float* workspace;         // selective_scan_workspace_bytes(*this) bytes (none needed when that is 0)
};
// Scratch for running time segments in parallel (0 when the batch alone fills the device). Depends on the sizes and
// the current device only, so the same arguments give the same answer before the launch.
size_t selective_scan_workspace_bytes(const SelectiveScanArgs& a);
cudaError_t selective_scan(const SelectiveScanArgs& a, cudaStream_t stream);

// Causal depthwise convolution continuing from conv_state_in; conv_state_out = the last k - 1 inputs.
struct CausalConv1dArgs {
  DType dtype;
  int64_t batch, seqlen, dim, width;  // b, l, e, k
  bool silu;
  const void* x;              // [b, l, e] T
  const float* state_in;      // [b, e, k - 1]
  const float* weight;        // [e, k]
  const float* bias;          // [e]
  void* y;                    // [b, l, e] T
  float* state_out;           // [b, e, k - 1]
};
cudaError_t causal_conv1d(const CausalConv1dArgs& a, cudaStream_t stream);

// What the two decode ops below share: the mixer's sizes, its float32 weights, its states in and out, and the
// workspace (each op's own *_workspace_bytes() says how large).
struct MixerStepArgs {
  int64_t batch, dim, dstate, width, dt_rank;  // b, e, n, k, r
  const float* conv_state_in;    // [b, e, k - 1]
  const float* ssm_state_in;     // [b, e, n]
  const float* conv_weight;      // [e, k]
  const float* conv_bias;        // [e]
  const float* x_proj_weight;    // [r + 2n, e]
  const float* dt_proj_weight;   // [e, r]
  const float* dt_bias;          // [e]
  const float* A;                // [e, n]
  const float* D;                // [e]
  float* conv_state_out;         // [b, e, k - 1]
  float* ssm_state_out;          // [b, e, n]
  float* workspace;              // 16-byte aligned
};

// One token of a Mamba mixer between in_proj and out_proj (MambaMixer.step): conv step + SiLU, x_proj, dt_proj,
// softplus, state update, output, gate. Needs a float32 device workspace of decode_step_workspace_bytes().
struct DecodeStepArgs : MixerStepArgs {
  DType dtype;
  const void* xz;                // [b, 1, 2e] T
  void* y;                       // [b, 1, e] T
};
size_t decode_step_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank);
cudaError_t decode_step(const DecodeStepArgs& a, cudaStream_t stream);

// One whole decode layer (DecodeBlock, every layer of a --decode-blocks decode.onnx), all sums float32:
//   h, residual_out = AddRMSNorm(x, residual, norm_weight)             (h in T, residual_out in R)
//   xz = T(h in_proj_weight^T); y, conv/ssm state = DecodeStep(xz, ...)  (y in T)
//   out = T(y out_proj_weight^T)
// Needs a float32 device workspace of decode_block_workspace_bytes().
struct DecodeBlockArgs : MixerStepArgs {
  DType dtype;                   // T: activations, norm weight, in_proj and out_proj weights
  DType residual_dtype;          // R: kFloat32 or dtype
  int64_t dmodel;                // d
  float epsilon;
  const void* x;                 // [b, 1, d] T
  const void* residual;          // [b, 1, d] R, or [1, 1, d] with residual_broadcast
  const void* norm_weight;       // [d] T
  const void* in_proj_weight;    // [2e, d] T (one row per output)
  const void* out_proj_weight;   // [d, e] T
  void* out;                     // [b, 1, d] T
  void* residual_out;            // [b, 1, d] R
  // True when norm_weight, in_proj_weight, conv_weight, conv_bias and x_proj_weight are never written while kernels
  // run on the stream (constant initializers of the graph): the kernel may then start before the previous kernel on
  // the stream has finished and read them early (programmatic dependent launch, sm_90+). Everything else it reads
  // only once that kernel has finished. MAMBA_EXPORT_CUDA_PDL=0 turns the early start off.
  bool constant_weights;
  // True when residual is one row added to every sequence (the exporter's zero residual of layer 0).
  bool residual_broadcast;
};
size_t decode_block_workspace_bytes(int64_t batch, int64_t dim, int64_t dstate, int64_t dt_rank);
cudaError_t decode_block(const DecodeBlockArgs& a, cudaStream_t stream);

// The decode step's tail (DecodeHead, the last node of a --decode-blocks decode.onnx), sums float32:
//   h = AddRMSNorm(x, residual, norm_weight) (in T; residual_out is not kept), logits = T(h weight^T).
// d_model up to what the normalised rows of 8 sequences (batch 1: one) take in shared memory, in 2048-value chunks.
struct DecodeHeadArgs {
  DType dtype;                   // T: x, norm_weight, weight, logits
  DType residual_dtype;          // R: kFloat32 or dtype
  int64_t batch, dmodel, vocab;  // b, d, V
  float epsilon;
  const void* x;                 // [b, 1, d] T
  const void* residual;          // [b, 1, d] R
  const void* norm_weight;       // [d] T
  const void* weight;            // [V, d] T (one row per vocabulary entry)
  void* logits;                  // [b, 1, V] T
  // True when norm_weight and weight are never written while kernels run on the stream: the kernel may then start
  // before the previous kernel has finished and load them early (as DecodeBlockArgs::constant_weights).
  bool constant_weights;
};
cudaError_t decode_head(const DecodeHeadArgs& a, cudaStream_t stream);

// RMSNorm (x == nullptr) and AddRMSNorm over `rows` rows of `dim` values (the b * l positions of [b, l, d]):
//   AddRMSNorm: residual_out = R(float32(residual) + float32(x)), then y from the ROUNDED residual_out;
//   both:       y = T(r / sqrt(mean(r^2) + epsilon) * float32(weight)), r = float32(residual or residual_out).
// T (`dtype`) is the weight's and y's type, R (`residual_dtype`) the residual stream's: float32, or T.
// One block per row, float32 arithmetic, warp-shuffle reductions.
struct RmsNormArgs {
  DType dtype;                 // T
  DType residual_dtype;        // R: kFloat32 or dtype
  int64_t rows, dim;           // b * l, d
  float epsilon;
  const void* x;               // [rows, d] T: AddRMSNorm's x (a block's output); nullptr for RMSNorm
  const void* residual;        // [rows, d] R: RMSNorm's x, AddRMSNorm's residual
  const void* weight;          // [d] T
  void* y;                     // [rows, d] T
  void* residual_out;          // [rows, d] R: AddRMSNorm only (ignored for RMSNorm)
};
cudaError_t rms_norm(const RmsNormArgs& a, cudaStream_t stream);

}  // namespace mamba_cuda
