"""Stepwise equals parallel: the recurrent state carries a sequence exactly."""

import pytest
import torch

from mamba_export.config import MambaConfig
from mamba_export.model import MambaLM
from support import rel_err

CONFIGS = [
    MambaConfig(d_model=32, n_layer=2, vocab_size=50),
    MambaConfig(d_model=24, n_layer=3, vocab_size=37, d_state=8, d_conv=3, dt_rank=5, bias=True,
                tie_embeddings=False),
    MambaConfig(d_model=16, n_layer=1, vocab_size=20, d_state=4, d_conv=2, conv_bias=False, expand=3),
]


def _model(cfg, dtype):
    torch.manual_seed(0)
    m = MambaLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "nondefault", "k2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@torch.no_grad()
def test_prefill_then_steps_equals_full_forward(cfg, dtype, tol):
    m = _model(cfg, dtype)
    ids = torch.randint(0, cfg.vocab_size, (3, 13))
    full, full_state = m(ids)
    logits, state = m(ids[:, :5])
    steps = [logits]
    for t in range(5, 13):
        lg, state = m.step(ids[:, t], state)
        steps.append(lg[:, None])
    assert rel_err(torch.cat(steps, 1), full) <= tol
    assert rel_err(state.ssm, full_state.ssm) <= tol
    assert rel_err(state.conv, full_state.conv) <= tol


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "nondefault", "k2"])
@pytest.mark.parametrize("split", [1, 2, 7, 12])
@torch.no_grad()
def test_two_chunks_equal_full_forward(cfg, split):
    m = _model(cfg, torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    full, full_state = m(ids)
    a, s = m(ids[:, :split])
    b, s = m(ids[:, split:], s)
    assert rel_err(torch.cat([a, b], 1), full) <= 1e-12
    assert rel_err(s.ssm, full_state.ssm) <= 1e-12


@torch.no_grad()
def test_state_layout_and_zero_state_is_start():
    cfg = CONFIGS[1]
    m = _model(cfg, torch.float32)
    st = m.empty_state(4)
    assert st.conv.shape == (cfg.n_layer, 4, cfg.d_inner, cfg.d_conv - 1)
    assert st.ssm.shape == (cfg.n_layer, 4, cfg.d_inner, cfg.d_state)
    assert st.conv.dtype == st.ssm.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (4, 6))
    assert torch.equal(m(ids)[0], m(ids, st)[0])
    # A non-zero state changes the output: the state is really read.
    other = type(st)(torch.randn_like(st.conv), torch.randn_like(st.ssm))
    assert rel_err(m(ids, other)[0], m(ids)[0]) > 1e-3


@torch.no_grad()
def test_conv_state_holds_the_last_inputs_for_short_chunks():
    """A chunk shorter than K - 1 must still shift older inputs through the conv state."""
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=30, d_conv=4)
    m = _model(cfg, torch.float64)
    ids = torch.randint(0, 30, (1, 9))
    full, _ = m(ids)
    state, outs = None, []
    for t in range(9):
        lg, state = m(ids[:, t:t + 1], state)
        outs.append(lg)
    assert rel_err(torch.cat(outs, 1), full) <= 1e-12


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    import os
    import stat

    from mamba_export.checkpoint import save_checkpoint

    out = save_checkpoint(_model(CONFIGS[0], torch.float32), tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
