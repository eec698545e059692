// Selective scan (prefill): h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = (C_t . h_t + D u_t) * silu(z_t).
//
// Work split: a block of kThreads threads owns `cpb` channels of one sequence; each channel's n states are spread
// over `tpc` consecutive lanes holding J states each in registers (state s = lane_in_group * J + j). Time runs
// sequentially in chunks of `lc` steps: the block stages the chunk's u, softplus(delta + bias), z (per channel) and
// B, C (per state) in shared memory as float32 with coalesced loads, runs the recurrence, gathers y in shared memory
// and stores it coalesced. The y reduction over a channel's states is a shuffle within its lane group.
#include "common.cuh"

namespace mamba_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxChunk = 64;
constexpr size_t kSmemBudget = 48 * 1024;

struct ScanShape {
  int64_t batch, seqlen, dim, dstate;
  int tpc, cpb, chunk;
};

template <typename T, int J>
__global__ void __launch_bounds__(kThreads) selective_scan_kernel(SelectiveScanArgs a, ScanShape s) {
  extern __shared__ float smem[];
  const int cpb = s.cpb, lc = s.chunk, tpc = s.tpc;
  const int64_t L = s.seqlen, E = s.dim, N = s.dstate;
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

  const int64_t b = blockIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const int cl = threadIdx.x / tpc;   // channel within the block
  const int sub = threadIdx.x % tpc;  // lane within the channel's group
  const int64_t e = c0 + cl;
  const bool active = cl < cpb && e < E;

  float h[J], A[J];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    const bool ok = active && st < N;
    h[j] = ok ? a.state_in[(b * E + e) * N + st] : 0.f;
    A[j] = ok ? a.A[e * N + st] : 0.f;
  }
  const float Dv = active ? a.D[e] : 0.f;

  for (int64_t t0 = 0; t0 < L; t0 += lc) {
    const int cnt = static_cast<int>(L - t0 < lc ? L - t0 : lc);
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
        zv = to_float(z[off]);
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
    for (int t = 0; t < cnt; ++t) {
      const float uv = s_u[t * cpb + cl], dt = s_dt[t * cpb + cl];
      const float dtu = dt * uv;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int st = sub * J + j;
        if (st < N) {
          h[j] = expf(dt * A[j]) * h[j] + dtu * s_B[t * N + st];
          acc += h[j] * s_C[t * N + st];
        }
      }
      acc = group_sum(acc, tpc);
      if (sub == 0 && cl < cpb) s_y[t * cpb + cl] = (acc + Dv * uv) * silu(s_z[t * cpb + cl]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < cnt * cpb; i += kThreads) {
      const int t = i / cpb, c = i % cpb;
      const int64_t ch = c0 + c;
      if (ch < E) y[(b * L + t0 + t) * E + ch] = from_float<T>(s_y[i]);
    }
  }
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int64_t st = static_cast<int64_t>(sub) * J + j;
    if (active && st < N) a.state_out[(b * E + e) * N + st] = h[j];
  }
}

template <typename T, int J>
cudaError_t launch(const SelectiveScanArgs& a, cudaStream_t stream) {
  ScanShape s{a.batch, a.seqlen, a.dim, a.dstate, 0, 0, 0};
  s.tpc = next_pow2((a.dstate + J - 1) / J);
  s.cpb = kThreads / s.tpc;
  const size_t per_step = (4 * static_cast<size_t>(s.cpb) + 2 * static_cast<size_t>(a.dstate)) * sizeof(float);
  s.chunk = static_cast<int>(kSmemBudget / per_step < kMaxChunk ? kSmemBudget / per_step : kMaxChunk);
  const dim3 grid(ceil_div(a.dim, s.cpb), static_cast<unsigned>(a.batch));
  selective_scan_kernel<T, J><<<grid, kThreads, per_step * s.chunk, stream>>>(a, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t selective_scan(const SelectiveScanArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.seqlen < 0 || a.dim < 0 || a.dstate < 1 || a.dstate > kMaxDState || a.batch > 65535) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  // States per thread: 4 by default, fewer when the grid would leave multiprocessors idle (small batch), more when
  // d_state exceeds 4 x 32 lanes.
  int J = a.dstate > 128 ? 8 : 4;
  const int sms = sm_count() > 0 ? sm_count() : 132;
  while (J > 1 && a.dstate > 1) {
    const int tpc = next_pow2((a.dstate + J - 1) / J);
    if (tpc >= 32 || a.batch * ceil_div(a.dim, kThreads / tpc) >= 2 * sms) break;
    J /= 2;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (J) {
      case 1: return launch<T, 1>(a, stream);
      case 2: return launch<T, 2>(a, stream);
      case 4: return launch<T, 4>(a, stream);
      default: return launch<T, 8>(a, stream);
    }
  });
}

}  // namespace mamba_cuda
