#!/usr/bin/env bash
# Build the custom-op library (custom_ops/) into custom_ops/build/libmamba_export_ops.so and copy it to
# runtime/mamba_runtime/lib/, where mamba_runtime.custom_op_library_path() finds it.
# Fetches onnxruntime's headers first when they are missing. Safe to run again: an unchanged tree rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/fetch_ort_headers.sh
GENERATOR=()
if command -v ninja >/dev/null; then
  GENERATOR=(-G Ninja)
fi
if [ ! -f custom_ops/build/CMakeCache.txt ]; then
  cmake -S custom_ops -B custom_ops/build "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build custom_ops/build --parallel "$(nproc 2>/dev/null || echo 2)"
mkdir -p runtime/mamba_runtime/lib
cp -p custom_ops/build/libmamba_export_ops.so runtime/mamba_runtime/lib/libmamba_export_ops.so
echo "build_custom_ops: runtime/mamba_runtime/lib/libmamba_export_ops.so"
