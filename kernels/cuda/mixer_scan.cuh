// The scan part of one decode token, shared by DecodeStep's phase 2 (decode_step.cu) and DecodeBlock's phase B
// (decode_block.cu): per work item, `cpb` channels of one sequence with `tpc` threads per channel, each thread holding
// J of the channel's states. load_scan_state issues the loads that do not depend on the earlier phase (the fused
// kernels issue them before their barrier); scan_step takes the x_proj output of the item's sequence (in shared
// memory) and does dt_proj, softplus, the state update and C.h. The first kWPrefetch of a lane's dt_proj weights
// travel in registers, the rest is loaded in scan_step, in the same k order either way.
#pragma once

#include "common.cuh"

namespace mamba_cuda {

constexpr int kWPrefetch = 16;  // dt_proj weights per lane loaded before the scan needs them

struct ScanItem {
  int64_t b, e;  // sequence and channel
  int sub;       // the thread's place among its channel's tpc threads
  bool active;   // whether the thread has a channel
};

// Item i: the channels of chunk i % chunks (cpb of them) of sequence i / chunks.
// i is a block index and chunks at most that many, so both fit in 32 bits (the division then does too).
__device__ __forceinline__ ScanItem scan_item_of(const MixerStepArgs& a, int64_t chunks, int cpb, int tpc, int64_t i) {
  ScanItem s;
  const unsigned ii = static_cast<unsigned>(i), ch = static_cast<unsigned>(chunks);
  s.b = ii / ch;
  const int cl = threadIdx.x / tpc;
  s.sub = threadIdx.x % tpc;
  s.e = static_cast<int64_t>(ii % ch) * cpb + cl;
  s.active = cl < cpb && s.e < a.dim;
  return s;
}

template <int J>
struct MixerScanLoads {
  float h[J], A[J], w[kWPrefetch];
};

// The thread's states and A values (states sub * J + j) and its first kWPrefetch dt_proj weights (k = sub, sub + tpc,
// ...); zeros where it has none.
template <int J>
__device__ __forceinline__ void load_scan_state(const MixerStepArgs& a, const ScanItem& s, int tpc,
                                                MixerScanLoads<J>& L) {
  // Row pointers once, then 32-bit offsets within the rows (d_state <= kMaxDState; the launchers bound dt_rank).
  const int N = static_cast<int>(a.dstate), R = static_cast<int>(a.dt_rank);
  const float* h = a.ssm_state_in + (s.b * a.dim + s.e) * N;
  const float* A = a.A + s.e * N;
  const float* w = a.dt_proj_weight + s.e * R;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int st = s.sub * J + j;
    const bool ok = s.active && st < N;
    L.h[j] = ok ? h[st] : 0.f;
    L.A[j] = ok ? A[st] : 0.f;
  }
#pragma unroll
  for (int q = 0; q < kWPrefetch; ++q) {
    const int k = s.sub + q * tpc;
    L.w[q] = (s.active && k < R) ? w[k] : 0.f;
  }
}

// dt = softplus(dt_proj . dbc[:r] + bias) (the channel's threads split the dot product), the new states
// h = exp(dt A) h + dt x B (written to ssm_state_out), and C.h summed over the channel's threads (every thread of the
// group gets it). s_dbc is the x_proj output [r + 2n] of the item's sequence: dt input, B, C.
template <int J>
__device__ __forceinline__ float scan_step(const MixerStepArgs& a, const ScanItem& s, int tpc,
                                           const MixerScanLoads<J>& L, float bias, float x, const float* s_dbc) {
  const int N = static_cast<int>(a.dstate), R = static_cast<int>(a.dt_rank);
  const int sub = s.sub;
  float dt_acc = 0.f;
  if (s.active) {
    const float* w = a.dt_proj_weight + s.e * R;
#pragma unroll
    for (int q = 0; q < kWPrefetch; ++q) {
      const int k = sub + q * tpc;
      if (k < R) dt_acc += L.w[q] * s_dbc[k];
    }
#pragma unroll 4
    for (int k = sub + kWPrefetch * tpc; k < R; k += tpc) dt_acc += w[k] * s_dbc[k];
  }
  dt_acc = group_sum(dt_acc, tpc);
  const float dt = s.active ? softplus(dt_acc + bias) : 0.f;
  float* h_out = a.ssm_state_out + (s.b * a.dim + s.e) * N;
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int st = sub * J + j;
    if (s.active && st < N) {
      const float h = expf(dt * L.A[j]) * L.h[j] + dt * x * s_dbc[R + st];
      h_out[st] = h;
      acc += h * s_dbc[R + N + st];
    }
  }
  return group_sum(acc, tpc);
}

}  // namespace mamba_cuda
