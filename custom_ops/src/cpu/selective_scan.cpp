// SelectiveScan on the CPU: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = (C_t . h_t + D u_t) * silu(z_t),
// with dt_t = softplus(delta_t + delta_bias).
//
// A task owns one batch row and a block of kChannelBlock channels for the whole sequence. Its state lives
// transposed in scratch, [n][block], so that the loops over channels (contiguous in u, delta, z and y at a given
// time step) are the vectorised ones, whatever n is.
#include <algorithm>

#include "dispatch.h"
#include "mamba_export_ops/cpu_kernels.h"
#include "prefetch.h"
#include "vec_math.h"

namespace mamba_export_ops {
namespace {

constexpr size_t CB = kChannelBlock;

struct ScanScratch {
  float* At;   // [n][CB] A of the block, transposed
  float* h;    // [n][CB] state, transposed
  float* dt;   // [CB]
  float* dtu;  // [CB] dt * u
  float* y;    // [CB] C . h
  float* Bt;   // [n] this step's B in float32
  float* Ct;   // [n] this step's C in float32
};

ScanScratch carve_scratch(float* base, size_t n) {
  float* h = base + n * CB;
  float* dt = h + n * CB;
  return {base, h, dt, dt + CB, dt + 2 * CB, dt + 3 * CB, dt + 3 * CB + n};
}

// Per time step: dt and dt*u for the block's channels.
template <typename T>
inline void scan_step_inputs(const SelectiveScanArgs<T>& a, size_t row, size_t c0, size_t cb, ScanScratch& s) {
#pragma omp simd
  for (size_t c = 0; c < cb; ++c) {
    float d = vec::to_float(a.delta[row + c]) + a.delta_bias[c0 + c];
    float dt = a.delta_softplus ? vec::softplus(d) : d;
    s.dt[c] = dt;
    s.dtu[c] = dt * vec::to_float(a.u[row + c]);
  }
}

// Per time step: advance the state of the block and accumulate C . h. Always all CB lanes (lanes past the block's
// channels hold zeros and stay zero): a constant trip count lets the compiler keep dt, dt*u and y in registers.
inline void scan_step_state(size_t n, ScanScratch& s) {
  float dt[CB], dtu[CB], y[CB] = {};
  for (size_t c = 0; c < CB; ++c) {
    dt[c] = s.dt[c];
    dtu[c] = s.dtu[c];
  }
  for (size_t j = 0; j < n; ++j) {
    const float bj = s.Bt[j], cj = s.Ct[j];
    float* __restrict h = s.h + j * CB;
    const float* __restrict at = s.At + j * CB;
#pragma omp simd
    for (size_t c = 0; c < CB; ++c) {
      float hv = vec::exp(dt[c] * at[c]) * h[c] + dtu[c] * bj;
      h[c] = hv;
      y[c] += hv * cj;
    }
  }
  for (size_t c = 0; c < CB; ++c) s.y[c] = y[c];
}

// Per time step: skip connection and gate, stored in T.
template <typename T>
inline void scan_step_output(const SelectiveScanArgs<T>& a, size_t row, size_t c0, size_t cb, const ScanScratch& s) {
#pragma omp simd
  for (size_t c = 0; c < cb; ++c) {
    float u = vec::to_float(a.u[row + c]);
    float out = (s.y[c] + a.D[c0 + c] * u) * vec::silu(vec::to_float(a.z[row + c]));
    a.y[row + c] = vec::from_float<T>(out);
  }
}

template <typename T>
void scan_block(const SelectiveScanArgs<T>& a, size_t task) {
  const size_t blocks = (a.e + CB - 1) / CB;
  const size_t bi = task / blocks, c0 = (task % blocks) * CB, cb = std::min(CB, a.e - c0), n = a.n;
  float* scratch = a.scratch + task * selective_scan_scratch_floats(n);
  std::fill(scratch, scratch + selective_scan_scratch_floats(n), 0.0f);  // lanes past cb stay zero
  ScanScratch s = carve_scratch(scratch, n);
  const float* state_in = a.state_in + (bi * a.e + c0) * n;
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j < n; ++j) {
      s.At[j * CB + c] = a.A[(c0 + c) * n + j];
      s.h[j * CB + c] = state_in[c * n + j];
    }
  }
  for (size_t t = 0; t < a.l; ++t) {
    const size_t row = (bi * a.l + t) * a.e + c0, bc = (bi * a.l + t) * n;
    if (t + kPrefetchSteps < a.l) {
      const size_t ahead = row + kPrefetchSteps * a.e;
      prefetch_slice(a.u + ahead, cb);
      prefetch_slice(a.delta + ahead, cb);
      prefetch_slice(a.z + ahead, cb);
    }
    for (size_t j = 0; j < n; ++j) {
      s.Bt[j] = vec::to_float(a.B[bc + j]);
      s.Ct[j] = vec::to_float(a.C[bc + j]);
    }
    scan_step_inputs(a, row, c0, cb, s);
    scan_step_state(n, s);
    scan_step_output(a, row, c0, cb, s);
  }
  float* state_out = a.state_out + (bi * a.e + c0) * n;
  for (size_t c = 0; c < cb; ++c) {
    for (size_t j = 0; j < n; ++j) state_out[c * n + j] = s.h[j * CB + c];
  }
}

MAMBA_CLONES void scan_block_f32(const SelectiveScanArgs<float>& a, size_t task) { scan_block(a, task); }
MAMBA_CLONES void scan_block_f16(const SelectiveScanArgs<half_t>& a, size_t task) { scan_block(a, task); }

}  // namespace

size_t selective_scan_num_tasks(size_t b, size_t e) { return b * ((e + CB - 1) / CB); }

size_t selective_scan_scratch_floats(size_t n) { return round_to_line(2 * n * CB + 3 * CB + 2 * n); }

template <>
void selective_scan_task<float>(const SelectiveScanArgs<float>& args, size_t task) {
  scan_block_f32(args, task);
}

template <>
void selective_scan_task<half_t>(const SelectiveScanArgs<half_t>& args, size_t task) {
  scan_block_f16(args, task);
}

}  // namespace mamba_export_ops
