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


def test_a_huge_intermediate_size_is_one_line(hf_dir):
    """transformers' intermediate_size is the inner width: 2**64 had reached torch.empty (an overflow TypeError)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2**64}))
    assert "the inner width is 18446744073709551616, more than this tool supports" in _err(hf_dir)


@pytest.mark.parametrize("layout", ["ss", "hf"])
def test_mutated_configs_load_or_are_refused_in_one_line(ss_dir, hf_dir, layout):
    """100 seeded damaged config.json files per layout (odd values, missing or extra keys, broken syntax): each loads
    or is one MambaExportError line, never another exception."""
    from support import mutated_manifests, refusals

    d = ss_dir if layout == "ss" else hf_dir
    text = (d / "config.json").read_text()

    def attempt(data: bytes) -> None:
        (d / "config.json").write_bytes(data)
        load_checkpoint(d)

    refused = refusals(mutated_manifests(text, 100, seed=1), attempt, MambaExportError)
    assert all("\n" not in str(e) for e in refused), [str(e) for e in refused if "\n" in str(e)]
    assert len(refused) >= 30


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


def test_random_bytes_are_not_called_pickled_objects(ss_dir):
    """Random bytes that torch's weights-only unpickler refuses name no Python object: damaged, not dangerous."""
    import numpy as np

    (ss_dir / "pytorch_model.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _err(ss_dir)
    assert "pytorch_model.bin: not a readable checkpoint file" in msg and "pickled Python objects" not in msg


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


def _edit_safetensors(d, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")


def test_transformers_keys_are_named_as_in_the_file(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] + 16}))
    assert "key 'backbone.embeddings.weight' has shape" in _err(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    _edit_safetensors(hf_dir, lambda sd: sd.pop("backbone.embeddings.weight"))
    assert "missing key 'backbone.embeddings.weight'" in _err(hf_dir)


def test_a_tied_model_saved_under_its_heads_name_loads(tmp_path):
    """transformers loads a tied checkpoint that holds only lm_head.weight; so do we, with the same logits."""
    from safetensors.torch import load_file, save_file

    hf = make_hf_model("tiny")
    d = save_transformers(hf, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["lm_head.weight"] = sd.pop("backbone.embeddings.weight")
    save_file(sd, d / "model.safetensors")
    model = load_checkpoint(d)
    assert model.lm_head.weight is model.backbone.embedding.weight
    ids = torch.randint(0, hf.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-5)


def test_weights_of_an_unsupported_dtype(hf_dir):
    _edit_safetensors(hf_dir, lambda sd: sd.update({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()
                                                    if k.endswith(".D")}))
    assert "has dtype float8_e4m3fn; supported: float32, float16, bfloat16, float64" in _err(hf_dir)


@pytest.mark.parametrize("index, message", [
    ({"weight_map": {"a": 1}}, "'weight_map' must map each tensor name to the file name of its shard"),
    ({"weight_map": ["x"]}, "'weight_map' must map each tensor name"),
    ({"metadata": {}}, "not a valid shard index (KeyError"),
])
def test_bad_shard_index(hf_dir, index, message):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert message in _err(hf_dir)


def test_rank_zero_is_an_error_not_auto(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "time_step_rank": 0}))
    assert 'time_step_rank must be a positive integer or "auto", found 0' in _err(hf_dir)


@pytest.mark.parametrize("layers, message", [
    (200_000_000, "missing every key of layer 3 ('backbone.layers.3.*'; config.json's num_hidden_layers is "
                  "200000000, the weights hold 3 layers)"),
    (2, "unexpected key 'backbone.layers.2."),
])
def test_layer_count_is_checked_before_building_the_model(hf_dir, layers, message):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    assert message in _err(hf_dir)  # at once: a model of 2e8 layers is never built


def test_config_json_that_is_a_directory(ss_dir):
    (ss_dir / "config.json").unlink()
    (ss_dir / "config.json").mkdir()
    assert "config.json: not a regular file" in _err(ss_dir)


@pytest.fixture
def sharded_dir(tmp_path):
    return save_transformers(make_hf_model("tiny"), tmp_path / "sharded", sharded=True)


def _shards(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


def test_a_tensor_held_by_two_shards_is_refused(sharded_dir):
    """A second (here zeroed) copy of a tensor in another shard had won silently, the later shard's."""
    from safetensors.torch import load_file, save_file

    index, shards = _shards(sharded_dir)
    name = next(k for k, s in index["weight_map"].items() if s == shards[0])
    other = sharded_dir / shards[1]
    save_file({**load_file(str(other)), name: torch.zeros(load_file(str(sharded_dir / shards[0]))[name].shape)},
              str(other))
    assert f"{shards[1]}: holds {name!r}, which {shards[0]} holds too" in _err(sharded_dir)


def test_shard_contents_must_match_the_index(sharded_dir):
    index, shards = _shards(sharded_dir)
    wm = index["weight_map"]
    held = next(s for s in shards if list(wm.values()).count(s) > 1)  # still listed after one of its tensors moves
    name = next(k for k, s in wm.items() if s == held)
    to = next(s for s in shards if s != held)
    moved = {**index, "weight_map": {**wm, name: to}}  # listed in the wrong shard
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(moved))
    assert f"{held}: holds {name!r}, which model.safetensors.index.json lists in {to}" in _err(sharded_dir)
    extra = {**index, "weight_map": {**index["weight_map"], "backbone.extra": shards[0]}}
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(extra))
    assert f"lists 'backbone.extra' in {shards[0]}, which does not hold it" in _err(sharded_dir)
    outside = {**index, "weight_map": {**index["weight_map"], name: "/etc/passwd"}}
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps(outside))
    assert "shard '/etc/passwd' is not a file name inside the checkpoint directory" in _err(sharded_dir)


@pytest.mark.parametrize("content", [b"", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n"],
                         ids=["empty", "lfs-pointer"])
def test_a_bin_that_is_no_pickle_says_so_without_torchs_advice(ss_dir, content):
    (ss_dir / "pytorch_model.bin").write_bytes(content)
    msg = _err(ss_dir)
    assert "pytorch_model.bin: not a readable checkpoint file (not a torch.save file" in msg
    assert "weights_only" not in msg and ("git lfs pull" in msg) == content.startswith(b"version")


def test_an_unreadable_or_too_deep_config_is_one_line(hf_dir, monkeypatch):
    (hf_dir / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "config.json: not valid JSON (nested too deeply)" in _err(hf_dir)
    (hf_dir / "config.json").write_text("{}")
    real = type(hf_dir).read_text

    def denied(self, *a, **k):  # root reads any file: stand in for a file the user may not read
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(type(hf_dir), "read_text", denied)
    assert "config.json: cannot read (Permission denied)" in _err(hf_dir)
