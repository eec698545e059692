#!/usr/bin/env bash
# The C++ code under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Builds the custom-op library's CPU part (custom_ops/build-sanitize/) and the C++ runtime (runtime/cpp/build-sanitize/)
# with -fsanitize=address,undefined, then runs the tests that execute them: every CPU op, DecodeBlock, DecodeHead and
# narrow-weight test (bad inputs included), the ONNX export, Python runtime, onnxruntime-genai and profile tests (the
# ops inside whole graphs) and the C++ runtime's tests (mamba_generate and api_checks, on broken exports too).
# - Any report fails the test that triggered it: ASan aborts the process, UBSan halts on the first error.
# - The Python process preloads the sanitizer runtimes (Python itself is not instrumented, so its own leaks at exit,
#   CPython's and torch's, are not checked); the C++ programs check for leaks too, with onnxruntime's own (allocated
#   once, never freed) suppressed.
# - Left out: the two tests that compile CUDA code (nvcc does not run with the sanitizers preloaded) and the bound on
#   the resident memory of a long decode (ASan keeps freed memory in quarantine).
# Extra arguments go to pytest (e.g. -x; test files named replace the list above, and a -k of your own replaces the
# exclusions). About 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
bash tools/setup.sh >/dev/null
PY=.venv/bin/python
for lib in libasan.so libubsan.so; do
  if [ ! -e "$(c++ -print-file-name=$lib)" ]; then
    echo "sanitize: the compiler has no $lib (Debian: apt-get install g++, which brings libasan and libubsan)" >&2
    exit 1
  fi
done
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
OPS=custom_ops/build-sanitize
echo "sanitize: building the custom-op library (CPU part) with the sanitizers in $OPS/" >&2
mkdir -p "$OPS"
cmake -S custom_ops -B "$OPS" -DMAMBA_EXPORT_OPS_CUDA=OFF -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS=$SAN" \
  "-DCMAKE_SHARED_LINKER_FLAGS=$SAN" >"$OPS/configure.log" 2>&1 || { cat "$OPS/configure.log" >&2; exit 1; }
cmake --build "$OPS" --parallel "$(nproc 2>/dev/null || echo 2)" >/dev/null
echo "sanitize: building the C++ runtime with the sanitizers in runtime/cpp/build-sanitize/" >&2
export MAMBA_SANITIZE=$SAN  # also for tests/test_cpp_runtime.py, which (re)builds with the build script
PYTHON=$PY bash tools/build_cpp_runtime.sh >/dev/null

# pytest captures the tests' stderr, and a process that ASan aborts takes its captured output with it: the reports go
# to files instead, printed at the end.
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
SUPPRESSIONS=$LOGS/lsan.supp
echo "leak:libonnxruntime.so" >"$SUPPRESSIONS"
export MAMBA_EXPORT_OPS_LIBRARY="$PWD/$OPS/libmamba_export_ops.so"
export LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:log_path=$LOGS/asan
export MAMBA_SANITIZE_PROGRAM_ASAN_OPTIONS=detect_leaks=1:log_path=$LOGS/asan  # for the C++ programs (the test file)
export LSAN_OPTIONS="suppressions=$SUPPRESSIONS:print_suppressions=0"
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan
TESTS=(tests/test_custom_ops_cpu.py tests/test_decode_block.py tests/test_decode_head.py
       tests/test_decode_narrow_weights.py tests/test_export_onnx.py tests/test_runtime_generate.py
       tests/test_runtime_units.py tests/test_genai.py tests/test_profile.py tests/test_cpp_runtime.py)
for arg in "$@"; do
  case "$arg" in tests/*) TESTS=() ;; esac  # tests named: only those
done
# Left out: the tests that compile CUDA code, and the one that bounds the resident memory of 5000 decode steps (ASan
# keeps freed memory in quarantine, 256 MiB by default).
status=0
"$PY" -m pytest -q -p no:cacheprovider -k "not compiles and not resident_memory" "${TESTS[@]}" "$@" || status=$?
reported=0
for report in "$LOGS"/asan.* "$LOGS"/ubsan.*; do
  [ -e "$report" ] || continue
  echo "sanitize: report of process ${report##*.}:" >&2
  cat "$report" >&2
  reported=1
done
if [ "$reported" = 1 ]; then
  exit 1
elif [ "$status" != 0 ]; then
  echo "sanitize: pytest failed (exit status $status); no sanitizer reported anything" >&2
else
  echo "sanitize: no sanitizer report" >&2
fi
exit "$status"
