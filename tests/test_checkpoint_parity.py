"""Parity of the reference model with transformers' MambaForCausalLM, through both checkpoint layouts."""

import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from support import (HF_CONFIGS, hf_logits, make_hf_model, padded_vocab_model, rel_err, save_state_spaces,
                     save_transformers)

SAVERS = {
    "ss-bin": lambda m, d: save_state_spaces(m, d, fmt="bin"),
    "ss-safetensors": lambda m, d: save_state_spaces(m, d, fmt="safetensors"),
    "hf-safetensors": lambda m, d: save_transformers(m, d),
    "hf-sharded": lambda m, d: save_transformers(m, d, sharded=True),
    "hf-bin": lambda m, d: save_transformers(m, d, fmt="bin"),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("layout", list(SAVERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_logits_match_transformers(tmp_path, name, layout, dtype, tol):
    hf = make_hf_model(name, seed=1).to(dtype)
    SAVERS[layout](hf, tmp_path / "ckpt")
    ours = load_checkpoint(tmp_path / "ckpt")
    assert ours.lm_head.weight.dtype == dtype
    ids = torch.randint(0, HF_CONFIGS[name]["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(hf, ids)
    got, _ = ours(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= tol


def test_sharded_checkpoint_really_has_shards(tmp_path):
    save_transformers(make_hf_model("tiny"), tmp_path, sharded=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1


def test_vocab_is_padded_to_the_multiple(tmp_path):
    hf104 = padded_vocab_model()  # vocab 101; state-spaces pads 101 -> 104 with multiple 8
    save_state_spaces(hf104, tmp_path, vocab_size=101, pad_vocab_size_multiple=8)
    ours = load_checkpoint(tmp_path)
    assert (ours.config.vocab_size, ours.config.real_vocab_size) == (104, 101)
    ids = torch.randint(0, 101, (1, 7))
    assert rel_err(ours(ids)[0], hf_logits(hf104, ids)) <= 1e-4


@pytest.mark.parametrize("store", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path, store):
    hf = make_hf_model("nondefault", seed=2).to(store)
    save_transformers(hf, tmp_path)
    native = load_checkpoint(tmp_path)
    assert native.lm_head.weight.dtype == store
    for k, v in hf.state_dict().items():
        k = k.replace("embeddings", "embedding")
        assert torch.equal(native.state_dict()[k], v), k
    # The stored values, computed in float32, against transformers in float32 on the same rounded weights.
    upcast = load_checkpoint(tmp_path, dtype=torch.float32)
    hf32 = hf.float()
    ids = torch.randint(0, 101, (2, 9))
    ref = hf_logits(hf32, ids)
    assert rel_err(upcast(ids)[0], ref) <= 1e-4
    # Native half-precision arithmetic stays within that precision's bounds.
    assert rel_err(native(ids)[0].float(), ref) <= (2e-2 if store == torch.float16 else 6e-2)
