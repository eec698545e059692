#!/usr/bin/env bash
# The main job on a fresh machine: set up, export the shipped model (models/kjv-byte) to ONNX with the custom-op
# library, and generate text with it through onnxruntime (mamba_runtime: no torch involved in generation).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
bash tools/setup.sh
.venv/bin/mamba-export export models/kjv-byte -o out/kjv-byte --last-logits --force
.venv/bin/mamba-export generate out/kjv-byte --prompt "And God said unto Moses, " \
    --max-new-tokens 200 --temperature 0.7 --top-k 40 --seed 1 --stream
echo
.venv/bin/mamba-export generate out/kjv-byte --prompt "In the beginning" --max-new-tokens 120 --greedy --json
