"""onnxruntime-genai runs our export directory (genai_config.json, custom-op library) like mamba_runtime does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mamba_export.errors import MambaExportError
from mamba_export.export import export_checkpoint
from mamba_runtime import MambaRuntime, custom_op_library_path
from support import make_hf_model, save_state_spaces

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = [[5, 17, 60, 3, 9], [42], list(range(30, 50))]
NEW = 24


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The "nondefault" test model (every option on; its greedy continuations vary), exported with the library."""
    try:
        custom_op_library_path()
    except MambaExportError as e:
        pytest.skip(f"custom-op library not built: {e}")
    root = tmp_path_factory.mktemp("genai")
    ckpt = save_state_spaces(make_hf_model("nondefault", seed=1), root / "ckpt")
    return export_checkpoint(ckpt, root / "export", with_library=True)


def _genai_greedy(model, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was picked from, with onnxruntime-genai's own generation loop."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + NEW)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    logits = []
    while not gen.is_done():
        logits.append(np.array(gen.get_logits()).reshape(-1))
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):], logits


def test_the_export_declares_the_library_to_genai(export_dir):
    cfg = json.loads((export_dir / "genai_config.json").read_text())
    lib = cfg["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert (export_dir / lib).is_file()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_genai_greedy_equals_mamba_runtime_token_for_token(export_dir, prompt):
    ours = MambaRuntime(export_dir, provider="cpu", threads=1, custom_ops="require")
    model = og.Model(str(export_dir))
    eos = json.loads((export_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    theirs, their_logits = _genai_greedy(model, prompt)
    assert ours.generate(prompt, NEW, stop_tokens=[eos]).tokens[0] == theirs
    assert len(set(theirs)) > 1  # the continuation is not one repeated token
    # and the logits each token was chosen from, through our prefill and decode graphs
    logits, conv, ssm = ours.prefill([prompt])
    state = ours.new_state(1)
    state.upload(conv, ssm)
    mine = [logits[0]] + [state.step(np.array([t]))[0].copy() for t in theirs[:-1]]
    for a, b in zip(mine, their_logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
