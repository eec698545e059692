// Software prefetch for the prefill kernels. A task's slice of one time step is a short run of channels, and
// consecutive time steps are e elements apart: too far for the hardware prefetchers, and behind a long stretch of
// arithmetic, so without a hint every time step waits for memory.
#pragma once

#include <cstddef>

namespace mamba_export_ops {

constexpr size_t kPrefetchSteps = 4;  // how many time steps ahead to fetch

// Asks for every cache line of p[0, count) (count >= 1).
template <typename T>
inline void prefetch_slice(const T* p, size_t count) {
  const char* first = reinterpret_cast<const char*>(p);
  const char* last = reinterpret_cast<const char*>(p + count) - 1;
  for (const char* q = first; q <= last; q += 64) __builtin_prefetch(q);
  __builtin_prefetch(last);
}

}  // namespace mamba_export_ops
