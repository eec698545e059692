#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with everything the project needs from the registries,
# the project installed in editable mode, and the custom-op library built. Safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # the repository root, also when called through a symbolic link
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip's own status, with one harmless warning filtered out of its output (grep finding no other line is no error)
pip_q() {
  python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}
# torch first and pinned: the CPU wheel of 2.13.0 is on this kind of machine's disk; a bare 'torch' would download
# a multi-gigabyte CUDA build.
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
pip_q -e ".[export,text,test]"
python -c "import torch, onnxruntime, mamba_export" >/dev/null
if [ -f tools/build_custom_ops.sh ]; then
  bash tools/build_custom_ops.sh
fi
echo "setup: done (.venv ready)"
