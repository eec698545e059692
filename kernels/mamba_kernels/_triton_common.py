"""Triton helpers shared by the kernels of this package."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lg2_approx(x):
    """log2 x by one SFU instruction (lg2.approx.f32; GPU only: inline PTX)."""
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rcp_approx(x):
    """1 / x by one SFU instruction (rcp.approx.ftz.f32; GPU only: inline PTX)."""
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def softplus(raw, SOFTPLUS: tl.constexpr, FAST: tl.constexpr = False):
    """softplus with torch's threshold 20 (the identity when SOFTPLUS is off). FAST (GPU only, never under the
    interpreter): ln 2 * lg2.approx(1 + 2^(x log2 e)), two SFU instructions, instead of libdevice's logf (~25)."""
    if SOFTPLUS:
        if FAST:
            e = tl.exp2(raw * 1.4426950408889634) + 1.0
            out = tl.where(raw > 20.0, raw, lg2_approx(e) * 0.6931471805599453)
        else:
            out = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    else:
        out = raw
    return out


@triton.jit
def sigmoid(z, FAST: tl.constexpr = False):
    """1 / (1 + e^-z). FAST (GPU only, never under the interpreter): rcp.approx(1 + ex2.approx(-z log2 e)), 2 SFU
    instructions instead of tl.sigmoid's ~10 (relative error ~1e-7; inf at z < -88 gives 0, as it should)."""
    if FAST:
        out = rcp_approx(tl.exp2(z * -1.4426950408889634) + 1.0)
    else:
        out = tl.sigmoid(z)
    return out


@triton.jit
def silu(z, FAST: tl.constexpr = False):
    """z sigmoid(z) (FAST: see sigmoid; 5 instructions instead of ~12)."""
    return z * sigmoid(z, FAST)


@triton.jit
def load_channel_vector(ptr, offs_d, mask_d, PRESENT: tl.constexpr):
    """A per-channel parameter (a bias, D) in fp32, zeros when absent."""
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(offs_d.shape, tl.float32)
    return v
