#!/usr/bin/env bash
# Build the custom-op library (custom_ops/) into custom_ops/build/libmamba_export_ops.so and copy it to
# runtime/mamba_runtime/lib/, where mamba_runtime.custom_op_library_path() finds it.
# Fetches onnxruntime's headers first when they are missing. Safe to run again: an unchanged tree rebuilds nothing.
# Extra arguments go to CMake's configure step (e.g. -DMAMBA_EXPORT_OPS_CUDA=OFF).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
bash tools/fetch_ort_headers.sh
CONFIGURE=(-S custom_ops -B custom_ops/build -DCMAKE_BUILD_TYPE=Release)
if [ ! -f custom_ops/build/CMakeCache.txt ] && command -v ninja >/dev/null; then
  CONFIGURE+=(-G Ninja)  # only for a new build folder: CMake refuses to switch the generator of an existing one
fi
# Configuring every time is cheap (well under a second) and repairs a build folder left half-configured. Of its
# output, only the project's own status lines are shown (e.g. whether the CUDA kernels are built).
cmake "${CONFIGURE[@]}" "$@" | { grep "mamba_export_ops:" || true; }
cmake --build custom_ops/build --parallel "$(nproc 2>/dev/null || echo 2)"
mkdir -p runtime/mamba_runtime/lib
# A process may have the installed library loaded (a test run, an app): overwriting the file in place would crash it
# (SIGBUS). So an unchanged library is left alone, and a new one replaces it by a rename: running processes keep the
# old file's pages, new ones load the new file.
built=custom_ops/build/libmamba_export_ops.so
installed=runtime/mamba_runtime/lib/libmamba_export_ops.so
if ! cmp -s "$built" "$installed"; then
  cp -p "$built" "$installed.tmp.$$"
  mv -f "$installed.tmp.$$" "$installed"
fi
echo "build_custom_ops: runtime/mamba_runtime/lib/libmamba_export_ops.so"
