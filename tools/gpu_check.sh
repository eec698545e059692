#!/usr/bin/env bash
# The one script a GPU-machine call runs: install onnxruntime-gpu (staged in /tmp/ortparts, see docs/gpu.md), build
# the custom-op library with its CUDA part, run the GPU tests, then the GPU benchmark. Logs and JSON go to $OUT.
#   bash tools/gpu_check.sh [tests|bench|profile|all|sanitize] [pytest -k expression]
# sanitize: the CUDA ops' tests (tests/test_cuda_ops.py; SANITIZE_TESTS names others, e.g. tests/kernels for the
# Triton kernels, which need no onnxruntime) under compute-sanitizer, once per tool in SANITIZE_TOOLS (default
# "initcheck racecheck memcheck"), each for at most SANITIZE_SECONDS (default 540; memcheck runs the DecodeBlock tests
# about 50x slower, so give it a -k expression or several calls). Without a -k expression the largest shapes are left
# out. A tool's reports go to $OUT/<tool>.<pid>.log; any report fails the step.
# With MAMBA_EXPORT_OPS_LIBRARY naming an existing file, that library is used instead of building one here.
# profile: export the shipped model (models/kjv-byte) in float16 and run `mamba-export profile --provider cuda` on it.
# Needs third_party/onnxruntime/include (tools/fetch_ort_headers.sh here; carry it to the GPU machine).
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
WHAT=${1:-all}
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
# Only the Triton kernels under the sanitizer (SANITIZE_TESTS without the CUDA ops' tests) need neither
# onnxruntime-gpu nor the library.
TRITON_ONLY=
if [ "$WHAT" = sanitize ] && [ -n "${SANITIZE_TESTS:-}" ] && [[ "$SANITIZE_TESTS" != *test_cuda* ]]; then
  TRITON_ONLY=1
fi
if [ ! -d /tmp/ortsite/onnxruntime ] && [ -z "$TRITON_ONLY" ]; then
  if ! ls /tmp/ortparts/part0* >/dev/null 2>&1; then
    echo "gpu_check: no onnxruntime-gpu parts in /tmp/ortparts (see docs/gpu.md)" >&2
    exit 1
  fi
  WHL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  (cd /tmp/ortparts && cat part0* > $WHL && python3 -m pip install -q --no-index --no-deps --target /tmp/ortsite $WHL) || exit 1
fi
export PYTHONPATH=/tmp/ortsite:$PWD:$PWD/kernels:$PWD/runtime
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, onnxruntime as o, cupy; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__, 'cupy', cupy.__version__)" || exit 1
if [ -n "$TRITON_ONLY" ]; then
  :
elif [ -n "${MAMBA_EXPORT_OPS_LIBRARY:-}" ] && [ -f "$MAMBA_EXPORT_OPS_LIBRARY" ]; then
  # A library built elsewhere from this tree (its CUDA part is compiled wherever nvcc is, the development machine
  # included): saves the ~80 s build on the GPU machine.
  echo "gpu_check: using the prebuilt $MAMBA_EXPORT_OPS_LIBRARY"
else
  BUILD=/tmp/gpu_check_build
  cmake -S custom_ops -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DORT_INCLUDE_DIR="$PWD/third_party/onnxruntime/include" > "$OUTDIR/cmake.log" 2>&1 || { cat "$OUTDIR/cmake.log"; exit 1; }
  grep "mamba_export_ops:" "$OUTDIR/cmake.log"
  cmake --build "$BUILD" --parallel 16 > "$OUTDIR/build.log" 2>&1 || { tail -40 "$OUTDIR/build.log"; exit 1; }
  export MAMBA_EXPORT_OPS_LIBRARY=$BUILD/libmamba_export_ops.so
fi
status=0
if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_cuda_ops.py tests/test_cuda_runtime.py ${2:+-k "$2"} \
    2>&1 | tee "$OUTDIR/tests.log" | grep -v "^tests/.*PASSED"
  status=${PIPESTATUS[0]}
fi
if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
  python3 tools/bench_gpu.py --models "${BENCH_MODELS-130m,1.4b}" ${BENCH_ARGS:-} --workdir /tmp/gpu_bench --out "$OUTDIR/bench.json" \
    2>&1 | tee "$OUTDIR/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$WHAT" = profile ] || [ "$WHAT" = all ]; then
  rm -rf /tmp/gpu_check_kjv16
  python3 -m mamba_export.cli export models/kjv-byte -o /tmp/gpu_check_kjv16 --dtype float16 \
    > "$OUTDIR/profile_export.log" 2>&1 || { cat "$OUTDIR/profile_export.log"; exit 1; }
  python3 -m mamba_export.cli profile /tmp/gpu_check_kjv16 --provider cuda ${PROFILE_ARGS:---batch 1,8 --position-tokens 2000} -o "$OUTDIR/profile_cuda" \
    2>&1 | tee "$OUTDIR/profile.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$WHAT" = sanitize ]; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/compute-sanitizer/compute-sanitizer)
  [ -x "$CS" ] || { echo "gpu_check: compute-sanitizer not found (CUDA toolkit)" >&2; exit 1; }
  "$CS" --version | tail -1
  LARGEST="not 64x4096 and not 9x2600 and not 50280 and not 1x2048x4096 and not 1x2048x192 and not two_streams"
  for tool in ${SANITIZE_TOOLS:-initcheck racecheck memcheck}; do
    echo "gpu_check: compute-sanitizer --tool $tool"
    timeout -k 5 "${SANITIZE_SECONDS:-540}" "$CS" --tool "$tool" --error-exitcode 99 --target-processes all \
      --print-limit 50 --log-file "$OUTDIR/$tool.%p.log" python3 -m pytest -q -p no:cacheprovider -rfEs \
      ${SANITIZE_TESTS:-tests/test_cuda_ops.py} -k "${2:-$LARGEST}" > "$OUTDIR/$tool.pytest.log" 2>&1
    rc=$?
    reached=$(grep -E '^[.FEsx]+( +\[ *[0-9]+%\])?$' "$OUTDIR/$tool.pytest.log" | tr -cd '.FEsx' | wc -c)
    echo "  $reached tests reached; $(tail -1 "$OUTDIR/$tool.pytest.log")"
    grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR/$tool".*.log | sort | uniq -c
    case $rc in
      0) ;;
      124|137) echo "gpu_check: $tool stopped after ${SANITIZE_SECONDS:-540} s (the tests it reached are above)" ;;
      *) echo "gpu_check: $tool failed (exit status $rc)"; status=1 ;;
    esac
  done
fi
exit $status
