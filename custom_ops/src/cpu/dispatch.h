// Runtime CPU dispatch without -march=native: on x86-64 with GCC or Clang, a kernel entry point marked MAMBA_CLONES
// is compiled twice, for x86-64-v3 (AVX2, FMA, F16C) and for the baseline, and the loader picks the clone the CPU
// supports. `flatten` inlines every helper into each clone, so the inner loops are vectorised for that target.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MAMBA_EXPORT_OPS_NO_CLONES)
#define MAMBA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MAMBA_CLONES
#endif
