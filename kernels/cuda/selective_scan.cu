// Selective scan (prefill): h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = (C_t . h_t + D u_t) * silu(z_t).
//
// Work split: a block of kThreads threads owns `cpb` channels of one sequence and one time segment; each channel's n
// states are spread over `tpc` consecutive lanes holding J = 4 states each in registers (s = lane_in_group * J + j).
// Time runs sequentially in steps of `lc` tokens: the block stages u, softplus(delta + bias), z (per channel) and B, C
// (per state) in shared memory as float32 with coalesced loads, runs the recurrence, gathers y in shared memory and
// stores it coalesced. The y reduction over a channel's states is a shuffle within its lane group.
//
// The recurrence is latency-bound per block, so the sequence is also cut into `segments` run in parallel (enough
// blocks for kBlocksPerSm per multiprocessor; a sequence of 2,048 tokens of mamba-130m gets ~45), in two
// launches of the same kernel (the recurrence is linear in h):
//   pass 1 (segments > 1): each segment but the last runs from h = 0 and stores its end state h_seg and sum(dt) per
//     channel in the workspace (the segment's decay is exp(A * sum(dt))); no y.
//   pass 2: each segment folds the earlier segments into its start state, h = exp(A * sum_dt[s]) h + h_seg[s]
//     starting from ssm_state_in, then runs again writing y; the last segment writes ssm_state_out.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxChunk = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr size_t kSmemBudget = 48 * 1024;
constexpr int64_t kMinSegment = 32;                    // tokens: shorter segments fold more than they scan
constexpr int kBlocksPerSm = 16;                       // blocks of 4 warps to aim for per multiprocessor
constexpr size_t kMaxWorkspace = size_t(256) << 20;    // bytes of segment states at most

struct ScanShape {
  int tpc, cpb, chunk;  // lanes per channel, channels per block, tokens staged at a time
  int64_t segments, seg_len;
};

struct ScanPlan {
  int J;
  ScanShape shape;
};

template <typename T, int J>
__global__ void __launch_bounds__(kThreads) selective_scan_kernel(SelectiveScanArgs a, ScanShape s, int pass) {
  extern __shared__ float smem[];
  const int cpb = s.cpb, lc = s.chunk, tpc = s.tpc;
  const int64_t L = a.seqlen, E = a.dim, N = a.dstate;
  float* s_u = smem;               // [lc][cpb]
  float* s_dt = s_u + lc * cpb;    // [lc][cpb]
  float* s_z = s_dt + lc * cpb;    // [lc][cpb]
  float* s_y = s_z + lc * cpb;     // [lc][cpb]
  float* s_B = s_y + lc * cpb;     // [lc][n]
  float* s_C = s_B + lc * N;       // [lc][n]

  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  const T* Bm = static_cast<const T*>(a.B);
  const T* Cm = static_cast<const T*>(a.C);
  const T* z = static_cast<const T*>(a.z);
  T* y = static_cast<T*>(a.y);

  const int64_t b = blockIdx.y, seg = blockIdx.z;
  const bool last_seg = seg == s.segments - 1;
  if (pass == 1 && last_seg) return;  // nothing later needs the last segment's end state
  const int64_t t_begin = seg * s.seg_len, t_end = last_seg ? L : t_begin + s.seg_len;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const int cl = threadIdx.x / tpc;   // channel within the block
  const int sub = threadIdx.x % tpc;  // lane within the channel's group
  const int64_t e = c0 + cl;
  const bool active = e < E;
  // Workspace: h_seg [b, segments, e, n] then sum_dt [b, segments, e].
  float* h_seg = a.workspace;
  float* sum_dt = a.workspace == nullptr ? nullptr : a.workspace + a.batch * s.segments * E * N;

  float h[J], A[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    const bool ok = active && st < N;
    A[j] = ok ? a.A[e * N + st] * kLog2e : 0.f;  // exp(dt A) = exp2(dt A log2(e)): one MUFU.EX2, no range reduction
    h[j] = (ok && pass == 2) ? a.state_in[(b * E + e) * N + st] : 0.f;
  }
  if (pass == 2 && active) {
    for (int64_t p = 0; p < seg; ++p) {
      const float decay_dt = sum_dt[(b * s.segments + p) * E + e];
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int64_t st = static_cast<int64_t>(sub) * J + j;
        if (st < N) h[j] = exp2f(decay_dt * A[j]) * h[j] + h_seg[((b * s.segments + p) * E + e) * N + st];
      }
    }
  }
  const float Dv = active ? a.D[e] : 0.f;
  float dt_total = 0.f;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += lc) {
    const int cnt = static_cast<int>(t_end - t0 < lc ? t_end - t0 : lc);
    __syncthreads();  // the previous chunk's shared memory is consumed
    for (int i = threadIdx.x; i < cnt * cpb; i += kThreads) {
      const int t = i / cpb, c = i % cpb;
      const int64_t ch = c0 + c;
      float uv = 0.f, dv = 0.f, zv = 0.f;
      if (ch < E) {
        const int64_t off = (b * L + t0 + t) * E + ch;
        uv = to_float(u[off]);
        dv = to_float(delta[off]) + a.delta_bias[ch];
        if (a.delta_softplus) dv = softplus(dv);
        if (pass == 2) zv = to_float(z[off]);
      }
      s_u[i] = uv;
      s_dt[i] = dv;
      s_z[i] = zv;
    }
    for (int i = threadIdx.x; i < cnt * N; i += kThreads) {
      const int64_t off = (b * L + t0) * N + i;
      s_B[i] = to_float(Bm[off]);
      s_C[i] = to_float(Cm[off]);
    }
    __syncthreads();
#pragma unroll 4
    for (int t = 0; t < cnt; ++t) {
      const float uv = s_u[t * cpb + cl], dt = s_dt[t * cpb + cl];
      const float dtu = dt * uv;
      dt_total += dt;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int st = sub * J + j;
        if (st < N) {
          h[j] = exp2f(dt * A[j]) * h[j] + dtu * s_B[t * N + st];
          acc += h[j] * s_C[t * N + st];
        }
      }
      if (pass == 2) {
        acc = group_sum(acc, tpc);
        if (sub == 0) s_y[t * cpb + cl] = (acc + Dv * uv) * silu(s_z[t * cpb + cl]);
      }
    }
    if (pass == 2) {
      __syncthreads();
      for (int i = threadIdx.x; i < cnt * cpb; i += kThreads) {
        const int t = i / cpb, c = i % cpb;
        const int64_t ch = c0 + c;
        if (ch < E) y[(b * L + t0 + t) * E + ch] = from_float<T>(s_y[i]);
      }
    }
  }
  if (!active) return;
  if (pass == 1) {
    if (sub == 0) sum_dt[(b * s.segments + seg) * E + e] = dt_total;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t st = static_cast<int64_t>(sub) * J + j;
      if (st < N) h_seg[((b * s.segments + seg) * E + e) * N + st] = h[j];
    }
  } else if (last_seg) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int64_t st = static_cast<int64_t>(sub) * J + j;
      if (st < N) a.state_out[(b * E + e) * N + st] = h[j];
    }
  }
}

// States per lane, lanes per channel and time segments for these sizes on the current device.
ScanPlan plan(const SelectiveScanArgs& a) {
  const int sms = sm_count() > 0 ? sm_count() : 132;
  const int64_t want_blocks = kBlocksPerSm * static_cast<int64_t>(sms);
  // States per lane: 4 (8 when d_state > 128). Parallelism beyond batch x channel blocks comes from time segments,
  // which cost less than spreading a channel's states over more lanes (each lane repeats the per-token loads).
  const int J = a.dstate > 128 ? 8 : 4;
  ScanPlan p{J, {}};
  ScanShape& s = p.shape;
  s.tpc = next_pow2((a.dstate + J - 1) / J);
  s.cpb = kThreads / s.tpc;
  const size_t per_step = (4 * static_cast<size_t>(s.cpb) + 2 * static_cast<size_t>(a.dstate)) * sizeof(float);
  s.chunk = static_cast<int>(kSmemBudget / per_step < kMaxChunk ? kSmemBudget / per_step : kMaxChunk);
  // Time segments: enough blocks to fill the device, segments of at least kMinSegment tokens, bounded workspace.
  const int64_t blocks = a.batch * ceil_div(a.dim, s.cpb);
  int64_t segments = (want_blocks + blocks - 1) / (blocks > 0 ? blocks : 1);
  const int64_t by_length = a.seqlen / kMinSegment;
  if (segments > by_length) segments = by_length;
  const size_t per_segment = static_cast<size_t>(a.batch * a.dim * (a.dstate + 1)) * sizeof(float);
  if (per_segment > 0 && static_cast<size_t>(segments) * per_segment > kMaxWorkspace) {
    segments = static_cast<int64_t>(kMaxWorkspace / per_segment);
  }
  if (segments > 65535) segments = 65535;
  if (segments < 1) segments = 1;
  s.seg_len = (a.seqlen + segments - 1) / segments;
  s.segments = a.seqlen > 0 ? (a.seqlen + s.seg_len - 1) / s.seg_len : 1;  // no empty segment
  return p;
}

template <typename T, int J>
cudaError_t launch(const SelectiveScanArgs& a, const ScanShape& s, cudaStream_t stream) {
  const size_t per_step = (4 * static_cast<size_t>(s.cpb) + 2 * static_cast<size_t>(a.dstate)) * sizeof(float);
  const dim3 grid(ceil_div(a.dim, s.cpb), static_cast<unsigned>(a.batch), static_cast<unsigned>(s.segments));
  if (s.segments > 1) {
    selective_scan_kernel<T, J><<<grid, kThreads, per_step * s.chunk, stream>>>(a, s, 1);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  selective_scan_kernel<T, J><<<grid, kThreads, per_step * s.chunk, stream>>>(a, s, 2);
  return cudaGetLastError();
}

bool valid(const SelectiveScanArgs& a) {
  return a.batch >= 0 && a.seqlen >= 0 && a.dim >= 0 && a.dstate >= 1 && a.dstate <= kMaxDState && a.batch <= 65535;
}

}  // namespace

size_t selective_scan_workspace_bytes(const SelectiveScanArgs& a) {
  if (!valid(a) || a.batch == 0 || a.dim == 0) return 0;
  const ScanPlan p = plan(a);
  if (p.shape.segments <= 1) return 0;
  return static_cast<size_t>(a.batch * p.shape.segments * a.dim * (a.dstate + 1)) * sizeof(float);
}

cudaError_t selective_scan(const SelectiveScanArgs& a, cudaStream_t stream) {
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  const ScanPlan p = plan(a);
  if (p.shape.segments > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return p.J == 8 ? launch<T, 8>(a, p.shape, stream) : launch<T, 4>(a, p.shape, stream);
  });
}

}  // namespace mamba_cuda
