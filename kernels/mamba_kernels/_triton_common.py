"""Triton helpers shared by the kernels of this package."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softplus(raw, SOFTPLUS: tl.constexpr):
    """softplus with torch's threshold 20 (the identity when SOFTPLUS is off)."""
    if SOFTPLUS:
        out = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    else:
        out = raw
    return out


@triton.jit
def load_channel_vector(ptr, offs_d, mask_d, PRESENT: tl.constexpr):
    """A per-channel parameter (a bias, D) in fp32, zeros when absent."""
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(offs_d.shape, tl.float32)
    return v
