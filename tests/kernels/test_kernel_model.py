"""The whole MambaLM on backend "triton" against backend "reference"; the ops under torch.compile and torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels_support import DEVICE, FP32_GRAD_TOL, rel_err
from mamba_export.config import MambaConfig
from mamba_export.model import MambaLM

mk = pytest.importorskip("mamba_kernels")

CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=8, d_conv=4, dt_rank=3, bias=True)


def train_step(model: MambaLM, ids: torch.Tensor):
    """Loss of next-token prediction and the gradient of every parameter."""
    model.zero_grad()
    logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_step_matches_reference():
    torch.manual_seed(0)
    truth_model = MambaLM(CFG).to(DEVICE, torch.float64)
    with torch.no_grad():
        for p in truth_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, CFG.vocab_size, (2, 41)).to(DEVICE)
    loss64, grads64 = train_step(truth_model, ids)
    ref = MambaLM(CFG).to(DEVICE)
    ref.load_state_dict(truth_model.state_dict())
    tri = MambaLM(CFG, backend="triton").to(DEVICE)
    tri.load_state_dict(truth_model.state_dict())
    assert tri.backend.name == "triton"
    loss_r, grads_r = train_step(ref, ids)
    loss_k, grads_k = train_step(tri, ids)
    assert abs(loss_k.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    bad = {}
    for name, g64 in grads64.items():
        err, bound = rel_err(grads_k[name], g64), max(2 * rel_err(grads_r[name], g64), FP32_GRAD_TOL)
        if not err <= bound:
            bad[name] = (err, bound)
    assert not bad, f"gradient errors above bounds (err, bound): {bad}"


def test_prefill_and_decode_match_reference():
    """Prefill through the scan and conv kernels, then three decode steps through the step kernels."""
    torch.manual_seed(1)
    ref = MambaLM(CFG).to(DEVICE)
    tri = MambaLM(CFG, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, CFG.vocab_size, (2, 12)).to(DEVICE)
    with torch.no_grad():
        full, _ = ref(ids)
        logits, state = tri(ids[:, :9])
        steps = [logits]
        for t in range(9, 12):
            step_logits, state = tri.step(ids[:, t], state)
            steps.append(step_logits[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def _scan_and_conv(x, w, delta, A, B, C, D, z, bias):
    xc, conv_state = mk.causal_conv1d(x, w, None, None, True)
    y, h = mk.selective_scan(xc, delta, A, B, C, D, z, bias, True, None)
    return y, h, conv_state


def _small_inputs():
    g = torch.Generator().manual_seed(2)
    b, d, l, n = 1, 4, 10, 4
    return [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in
            [(b, d, l), (d, 4), (b, d, l), (d, n), (b, n, l), (b, n, l), (d,), (b, d, l), (d,)]]


def test_torch_compile_sees_one_op_per_kernel_no_graph_break():
    args = _small_inputs()
    eager = _scan_and_conv(*args)
    compiled = torch.compile(_scan_and_conv, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    loss_e = sum(t.sum() for t in eager)
    loss_c = sum(t.sum() for t in compiled)
    for ge, gc in zip(torch.autograd.grad(loss_e, args), torch.autograd.grad(loss_c, args)):
        torch.testing.assert_close(ge, gc)


def test_torch_export_graph_holds_the_custom_ops():
    class Layer(torch.nn.Module):
        def forward(self, *a):
            return _scan_and_conv(*a)

    args = [a.detach() for a in _small_inputs()]
    code = torch.export.export(Layer(), tuple(args)).graph_module.code
    assert "mamba_kernels.selective_scan_fwd" in code and "mamba_kernels.causal_conv1d_fwd" in code
