#!/usr/bin/env bash
# Build the C++ runtime (runtime/cpp): libmamba_runtime.a, the mamba_generate example and api_checks, in
# runtime/cpp/build/.
#
# Needs cmake, a C++17 compiler, the onnxruntime headers (fetched by tools/fetch_ort_headers.sh when missing) and the
# onnxruntime Python wheel in $PYTHON (default .venv/bin/python), whose libonnxruntime the programs link against.
# Idempotent and incremental: a second run with nothing changed only re-checks (about a second).
# Prints the path of mamba_generate as its last line.
# MAMBA_SANITIZE="<compiler flags>" (e.g. "-fsanitize=address,undefined") builds with them, into
# runtime/cpp/build-sanitize/ instead (tools/sanitize.sh sets it).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
PY=${PYTHON:-.venv/bin/python}
BUILD=runtime/cpp/build
FLAGS=()
if [ -n "${MAMBA_SANITIZE:-}" ]; then
  BUILD=runtime/cpp/build-sanitize
  FLAGS=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS=$MAMBA_SANITIZE"
         "-DCMAKE_EXE_LINKER_FLAGS=$MAMBA_SANITIZE")
fi
if ! "$PY" -c "import onnxruntime" 2>/dev/null; then
  echo "build_cpp_runtime: $PY has no onnxruntime; run bash tools/setup.sh (or set PYTHON)" >&2
  exit 1
fi
for tool in cmake c++; do
  if ! command -v "$tool" >/dev/null; then
    echo "build_cpp_runtime: $tool not found; install it (Debian: apt-get install cmake g++)" >&2
    exit 1
  fi
done
bash tools/fetch_ort_headers.sh
mkdir -p "$BUILD"
# One build at a time in this folder (two test runs may start it together).
exec 9>"$BUILD/.build.lock"
flock 9
cmake -S runtime/cpp -B "$BUILD" -DMAMBA_PYTHON="$("$PY" -c 'import sys; print(sys.executable)')" "${FLAGS[@]}" \
  >"$BUILD/configure.log" 2>&1 || {
  cat "$BUILD/configure.log" >&2
  exit 1
}
cmake --build "$BUILD" -j "${JOBS:-2}" >&2
echo "$PWD/$BUILD/mamba_generate"
