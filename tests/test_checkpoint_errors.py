"""Every bad checkpoint gives one clear error naming the file, the key, expected and found; the CLI prints that line."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from mamba_export.errors import CheckpointError, MambaExportError
from support import make_hf_model, save_state_spaces, save_transformers


@pytest.fixture
def ss_dir(tmp_path):
    return save_state_spaces(make_hf_model("tiny"), tmp_path / "ss", fmt="bin")


@pytest.fixture
def hf_dir(tmp_path):
    return save_transformers(make_hf_model("nondefault"), tmp_path / "hf")


def _err(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    assert "checkpoint directory does not exist" in _err(tmp_path / "nope")


def test_missing_config(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    msg = _err(tmp_path)
    assert "config.json" in msg and "missing" in msg


def test_config_not_json(ss_dir):
    (ss_dir / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _err(ss_dir)


def test_unknown_layout(ss_dir):
    (ss_dir / "config.json").write_text(json.dumps({"n_embd": 64}))
    assert "unknown checkpoint layout" in _err(ss_dir)


def test_other_model_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba2"}))
    assert "model_type 'mamba2' is not a Mamba-1 model" in _err(hf_dir)


def test_no_weights(ss_dir):
    os.remove(ss_dir / "pytorch_model.bin")
    msg = _err(ss_dir)
    assert "no weights found" in msg and "model.safetensors" in msg


@pytest.mark.parametrize("field, value, message", [
    ("norm_epsilon", -1, "norm_epsilon must be a positive number"),
    ("norm_epsilon", "1e-5", "norm_epsilon must be a positive number"),
    ("tie_embeddings", "false", "tie_embeddings must be true or false"),
    ("residual_in_fp32", 0, "residual_in_fp32 must be true or false"),
    ("d_model", 64.5, "d_model must be an integer"),
    ("d_model", 10**12, "more than this tool supports"),
    ("n_layer", True, "n_layer must be an integer"),
])
def test_config_values_are_checked_strictly(ss_dir, field, value, message):
    """A value of the wrong type or range in config.json is one line, not read leniently ("false" as true, 64.5 as
    64) and not found out later (a negative epsilon in onnxruntime, a huge size as an allocation failure)."""
    cfg = json.loads((ss_dir / "config.json").read_text())
    (ss_dir / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(MambaExportError) as e:
        load_checkpoint(ss_dir)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_non_finite_weights(ss_dir):
    sd = torch.load(ss_dir / "pytorch_model.bin")
    sd["backbone.layers.1.mixer.D"][3] = float("nan")
    torch.save(sd, ss_dir / "pytorch_model.bin")
    assert "'backbone.layers.1.mixer.D' holds NaN or infinite values" in _err(ss_dir)


def test_missing_key(ss_dir):
    sd = torch.load(ss_dir / "pytorch_model.bin")
    del sd["backbone.layers.1.mixer.A_log"]
    torch.save(sd, ss_dir / "pytorch_model.bin")
    msg = _err(ss_dir)
    assert "pytorch_model.bin" in msg and "missing key 'backbone.layers.1.mixer.A_log'" in msg and "[128, 16]" in msg


def test_unexpected_key(ss_dir):
    sd = torch.load(ss_dir / "pytorch_model.bin")
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    torch.save(sd, ss_dir / "pytorch_model.bin")
    msg = _err(ss_dir)
    assert "pytorch_model.bin" in msg and "unexpected key 'backbone.layers.0.mixer.extra'" in msg


def test_shape_disagrees_with_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "state_size": 16}))
    msg = _err(hf_dir)
    assert "model.safetensors" in msg and "has shape" in msg and "expected" in msg
    assert "[96, 8]" in msg or "[37, 96]" in msg  # found (A_log with N=8) or x_proj's rows


def test_truncated_safetensors(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _err(hf_dir)
    assert "model.safetensors: not a readable checkpoint file" in msg


def test_truncated_bin(ss_dir):
    data = (ss_dir / "pytorch_model.bin").read_bytes()
    (ss_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    assert "pytorch_model.bin: not a readable checkpoint file" in _err(ss_dir)


def test_not_a_checkpoint(ss_dir):
    (ss_dir / "pytorch_model.bin").write_bytes(b"hello, this is a text file\n" * 10)
    assert "pytorch_model.bin: not a readable checkpoint file" in _err(ss_dir)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mamba_export_pwned",))


def test_pickled_code_is_not_executed(ss_dir):
    if os.path.exists("/tmp/mamba_export_pwned"):
        os.remove("/tmp/mamba_export_pwned")
    with open(ss_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"backbone.embedding.weight": _Evil()}, f)
    msg = _err(ss_dir)
    assert "pytorch_model.bin: holds pickled Python objects besides tensors" in msg and "weights_only" not in msg
    assert not os.path.exists("/tmp/mamba_export_pwned")


def test_tied_config_but_different_head(ss_dir):
    sd = torch.load(ss_dir / "pytorch_model.bin")
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, ss_dir / "pytorch_model.bin")
    assert "'lm_head.weight' differs from the embedding" in _err(ss_dir)


def test_untied_needs_head(hf_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, hf_dir / "model.safetensors")
    assert "missing key 'lm_head.weight'" in _err(hf_dir)


def test_cli_prints_one_line_and_exits_nonzero(ss_dir):
    (ss_dir / "pytorch_model.bin").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "mamba_export.cli", "inspect", str(ss_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("mamba-export inspect: error:") and "pytorch_model.bin" in lines[0]


def test_cli_inspect_good_checkpoint(hf_dir):
    r = subprocess.run([sys.executable, "-m", "mamba_export.cli", "inspect", "--json", str(hf_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["layout"] == "transformers"
    assert info["config"]["d_state"] == 8 and info["config"]["dt_rank"] == 5 and info["config"]["d_conv"] == 3
