"""TorchScript export: model.pt / decode.pt / model_last.pt load with torch.jit.load and match the reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from mamba_export.export import export_checkpoint, export_model
from mamba_export.export.graphs import example_inputs
from mamba_export.model import MambaLM
from support import make_hf_model, rel_err, save_state_spaces

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    ckpt = save_state_spaces(make_hf_model("nondefault", seed=3), root / "ckpt", fmt="safetensors")
    out = export_checkpoint(ckpt, root / "export", fmt="torchscript", last_logits=True)
    return out, load_checkpoint(ckpt, dtype=torch.float64)


def test_files_and_manifest(exported):
    out, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["decode.pt", "manifest.json", "model.pt", "model_last.pt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "torchscript" and manifest["custom_op_library"] is None
    assert set(manifest["graphs"]) == {"model.pt", "decode.pt", "model_last.pt"}


def test_files_do_not_name_the_exporting_machines_paths(exported):
    """The archives leave out TorchScript's debug records, whose source ranges name our source tree and torch's."""
    import zipfile
    from pathlib import Path

    out, _ = exported
    here = str(Path(__file__).resolve().parents[1]).encode()
    for name in ("model.pt", "decode.pt", "model_last.pt"):
        with zipfile.ZipFile(out / name) as z:
            assert not [n for n in z.namelist() if n.endswith(".debug_pkl")], name
            assert not any(here in z.read(n) or torch.__file__.encode() in z.read(n) for n in z.namelist()), name


def test_prefill_decode_and_last_match_reference(exported):
    out, ref = exported
    c = ref.config
    ids = torch.randint(0, c.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))  # not the traced sizes
    model, decode = torch.jit.load(str(out / "model.pt")), torch.jit.load(str(out / "decode.pt"))
    with torch.no_grad():
        want, _ = ref(ids)
        logits, *state = model(ids[:, :6], *example_inputs(c, 3, 1)[1:])
        steps = [logits]
        for t in range(6, 10):
            logits, *state = decode(ids[:, t:t + 1], *state)
            steps.append(logits)
        last, *_ = torch.jit.load(str(out / "model_last.pt"))(ids, *example_inputs(c, 3, 1)[1:])
    assert rel_err(torch.cat(steps, dim=1), want) <= 1e-4
    assert last.shape == (3, 1, c.vocab_size) and rel_err(last, want[:, -1:]) <= 1e-4
    assert all(s.dtype == torch.float32 for s in state)


def test_decode_refuses_more_than_one_token(exported):
    """decode.pt takes (batch, 1) as decode.onnx does; two tokens are an error, not wrong logits."""
    out, ref = exported
    decode = torch.jit.load(str(out / "decode.pt"))
    state = example_inputs(ref.config, 1, 1)[1:]
    with torch.no_grad():
        logits, *_ = decode(torch.tensor([[5]]), *state)
        assert logits.shape == (1, 1, ref.config.vocab_size)
        with pytest.raises(Exception, match=r"decode.pt takes one token per sequence"):
            decode(torch.tensor([[5, 6]]), *state)


def test_loads_without_this_package(exported):
    out, ref = exported
    code = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); "
        "assert 'mamba_export' not in sys.modules; "
        f"print(m(torch.zeros(1, 2, dtype=torch.long), *{_state_expr(ref.config)})[0].shape)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out / "model.pt")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"torch.Size([1, 2, {ref.config.vocab_size}])"


def _state_expr(c) -> str:
    layer = f"torch.zeros(1, {c.d_inner}, {c.d_conv - 1}), torch.zeros(1, {c.d_inner}, {c.d_state})"
    return "[" + ", ".join([layer] * c.n_layer) + "]"


def test_modules_run_as_inference_without_no_grad(exported):
    """Saved without requires_grad: called as the docs show (no torch.no_grad), the outputs are plain tensors that
    .numpy() takes; the exported model's own parameters keep their flags."""
    out, ref = exported
    c = ref.config
    for name in ("model.pt", "decode.pt", "model_last.pt"):
        module = torch.jit.load(str(out / name))
        assert not any(p.requires_grad for p in module.parameters()), name
        ids = torch.zeros((1, 1), dtype=torch.int64)
        outputs = module(ids, *example_inputs(c, 1, 1)[1:])
        assert not any(t.requires_grad for t in outputs), name
        outputs[0].numpy()
    model = MambaLM(c)
    export_model(model, out.parent / "again", fmt="torchscript")
    assert all(p.requires_grad for p in model.parameters())
