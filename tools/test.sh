#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite. GPU tests skip where there is no GPU.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
