#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run what the project does end to end so far.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python - <<'PY'
import tempfile, torch
from mamba_export.config import MambaConfig
from mamba_export.model import MambaLM
from mamba_export.checkpoint import save_checkpoint
torch.manual_seed(0)
d = tempfile.mkdtemp()
save_checkpoint(MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256)), d + "/ckpt")
print(d + "/ckpt")
PY
