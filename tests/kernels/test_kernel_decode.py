"""Triton selective_state_update (one decode token) against the float64 reference, and against one scan step."""

from __future__ import annotations

import pytest
import torch

from kernels_support import DEVICE, FP32_FWD_TOL, rel_err
from mamba_export.ops import selective_state_update_ref

mk = pytest.importorskip("mamba_kernels")


def decode_inputs(b, d, n, dtype, optional=True, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    x = torch.randn(b, 2 * d, generator=g).to(dtype)
    out = dict(state=r(b, d, n, dt=torch.float32), x=x[:, :d], dt=r(b, d), A=-torch.rand(d, n, generator=g) - 0.1,
               B=r(b, n), C=r(b, n), D=r(d, dt=torch.float32) if optional else None,
               z=x[:, d:] if optional else None, dt_bias=r(d, dt=torch.float32) if optional else None)
    return {k: None if v is None else v.to(DEVICE) for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optional", [True, False])
def test_state_update_matches_reference(dtype, optional):
    x = decode_inputs(3, 20, 6, dtype, optional, seed=int(optional))
    y, h = mk.selective_state_update(**x, dt_softplus=optional)
    y64, h64 = selective_state_update_ref(**{k: None if v is None else v.double() for k, v in x.items()},
                                          dt_softplus=optional)
    y_r, _ = selective_state_update_ref(**x, dt_softplus=optional)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert rel_err(h, h64) <= FP32_FWD_TOL
    assert rel_err(y, y64) <= max(2 * rel_err(y_r, y64), FP32_FWD_TOL)


def test_state_update_equals_one_scan_step():
    x = decode_inputs(2, 8, 4, torch.float32, seed=3)
    y, h = mk.selective_state_update(**x, dt_softplus=True)
    ys, hs = mk.selective_scan(x["x"][..., None], x["dt"][..., None], x["A"], x["B"][..., None], x["C"][..., None],
                               x["D"], x["z"][..., None], x["dt_bias"], True, x["state"])
    torch.testing.assert_close(y, ys[..., 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, hs, rtol=1e-6, atol=1e-6)


def test_state_update_rejects_bad_inputs():
    x = decode_inputs(2, 8, 4, torch.float32)
    x["B"] = torch.zeros(2, 5, device=DEVICE)
    with pytest.raises(mk.KernelInputError, match=r"B must have shape \(2, 4\)"):
        mk.selective_state_update(**x)
