"""Selective scan (Mamba-1's S6) forward and backward in Triton, chunked over time.

Contract: :func:`selective_scan` has the signature, layouts and return values of
:func:`mamba_export.ops.selective_scan_ref` (channels before time; fp32 state arithmetic whatever the input dtype).

Recurrence, per channel d and state n (Δ after bias and softplus):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t;   y_t = (C_t . h_t + D u_t) silu(z_t)

How it runs. Time is cut into tiles of ``_T`` steps; a tile of (BLOCK_D channels, _T steps, N states) is scanned
in registers with ``tl.associative_scan`` (pairs (a, b) composed as h -> a h + b). Tiles are grouped into chunks,
one program per (channel block, chunk, batch), so that batch 1 at 64k tokens still fills the GPU:
    1. each chunk scans from a zero state: its local end state and sum of Δ    (_fwd_local_kernel, skipped for 1 chunk)
    2. one short sequential pass carries states across chunks                  (_carry_kernel)
    3. each chunk scans again from its true start state, writes y, and saves the state at each tile start
                                                                               (_fwd_chunk_kernel)
The backward mirrors it for the adjoint g_t = dL/dh_t, a reverse recurrence g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}
(_bwd_local_kernel, _carry_kernel reversed, _bwd_chunk_kernel), recomputing each tile's states from the saved tile
start states. Memory beyond inputs and outputs is O(b d n l / _T), never the (b, d, l, n) states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_runnable, check_tensor, contiguous_or_none

__all__ = ["selective_scan"]

_T = 32  # time steps per register tile; the backward keeps one fp32 state per tile
# Per pass: elements of one (BLOCK_D, _T, BLOCK_N) fp32 tile, and warps per program. Larger backward tiles mean
# fewer channel blocks adding into dB and dC.
_FWD_TILE = {"elements": 4096, "warps": 4}
_BWD_TILE = {"elements": 4096, "warps": 4}
# Chunking costs a second pass over the sequence, so it is used only where batch x channel blocks give fewer than
# _UNCHUNKED_PROGRAMS_PER_SM programs per SM, and then cuts enough chunks for _CHUNKED_PROGRAMS_PER_SM (measured on
# H100, docs/kernels.md: b8 d1536 l2048 fastest unchunked; b1 d1536 l65536 fwd+bwd 74 -> 57 ms going from 4 to 32).
_UNCHUNKED_PROGRAMS_PER_SM = 4
_CHUNKED_PROGRAMS_PER_SM = 32


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1, then h -> a2 h + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _load_delta(ptrs, mask, bias, SOFTPLUS: tl.constexpr):
    """Δ in fp32 after bias (and softplus, torch's threshold 20), 0 where masked; and the value before softplus."""
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_vector(ptr, offs_d, mask_d, PRESENT: tl.constexpr):
    """A per-channel parameter (D or the Δ bias) in fp32, zeros when absent."""
    if PRESENT:
        v = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(offs_d.shape, tl.float32)
    return v


@triton.jit
def _pick(x, offs_t, t: tl.constexpr):
    """x[:, t, :] of a (BLOCK_D, _T, BLOCK_N) tile."""
    return tl.sum(tl.where((offs_t == t)[None, :, None], x, 0.0), axis=1)


@triton.jit
def _tile_ptrs(pid_b, offs_d, offs_t, s_b, s_d, s_l):
    """Pointer offsets of a (BLOCK_D, _T) tile of a (b, d, l) tensor."""
    return pid_b * s_b + offs_d[:, None] * s_d + offs_t[None, :] * s_l


@triton.jit
def _bc_ptrs(pid_b, offs_n, offs_t, s_b, s_n, s_l):
    """Pointer offsets of a (_T, BLOCK_N) tile of a (b, n, l) tensor (B or C), time first."""
    return pid_b * s_b + offs_n[None, :] * s_n + offs_t[:, None] * s_l


@triton.jit
def _state_ptrs(pid_b, offs_d, idx, offs_n, DIM, NIDX, N):
    """Pointer offsets of a (BLOCK_D, BLOCK_N) slice [b, :, idx, :] of a contiguous (b, d, NIDX, n) tensor."""
    return ((pid_b * DIM + offs_d[:, None]) * NIDX + idx) * N + offs_n[None, :]


# ----------------------------------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def _fwd_local_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, local_ptr, dsum_ptr,
    L, DIM, N, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per chunk, from a zero state: the end state -> local (b, d, chunks, n), and sum of Δ -> dsum (b, d, chunks)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_dn = (offs_d < DIM)[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = _load_vector(bias_ptr, offs_d, offs_d < DIM, HAS_BIAS)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dsum = tl.zeros((BLOCK_D,), tl.float32)
    for j in range(pid_c * SUBS, tl.minimum((pid_c + 1) * SUBS, NSUB)):
        offs_t = j * BLOCK_T + offs_t0
        mask = (offs_d < DIM)[:, None] & (offs_t < L)[None, :]
        delta, _ = _load_delta(dt_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sdt_b, sdt_d, sdt_l), mask, bias[:, None],
                               SOFTPLUS)
        u = tl.load(u_ptr + _tile_ptrs(pid_b, offs_d, offs_t, su_b, su_d, su_l), mask=mask, other=0.0).to(tl.float32)
        mask_tn = (offs_t < L)[:, None] & (offs_n < N)[None, :]
        B = tl.load(B_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sB_b, sB_n, sB_l), mask=mask_tn, other=0.0).to(tl.float32)
        dA = tl.exp(delta[:, :, None] * A[:, None, :])
        P, hl = tl.associative_scan((dA, (delta * u)[:, :, None] * B[None, :, :]), 1, _combine)
        h = _pick(hl + P * h[:, None, :], offs_t0, BLOCK_T - 1)
        dsum += tl.sum(delta, axis=1)
    tl.store(local_ptr + _state_ptrs(pid_b, offs_d, pid_c, offs_n, DIM, NCHUNK, N), h, mask=mask_dn)
    tl.store(dsum_ptr + (pid_b * DIM + offs_d) * NCHUNK + pid_c, dsum, mask=offs_d < DIM)


@triton.jit
def _carry_kernel(
    A_ptr, init_ptr, local_ptr, dsum_ptr, out_ptr, DIM, N, NCHUNK,
    REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Carry a state across chunks: out[c] = s, then s = exp(A dsum[c]) s + local[c], from s = init.

    Forward (REVERSE False): out[c] is the state at the start of chunk c. Reverse: the chunks run last to first and
    out[c] is the adjoint flowing into chunk c from its right. init: contiguous (b, d, n); local, out: (b, d, c, n).
    """
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_dn = (offs_d < DIM)[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    s = tl.load(init_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], mask=mask_dn, other=0.0)
    for i in range(NCHUNK):
        c = NCHUNK - 1 - i if REVERSE else i
        ptrs = _state_ptrs(pid_b, offs_d, c, offs_n, DIM, NCHUNK, N)
        tl.store(out_ptr + ptrs, s, mask=mask_dn)
        dsum = tl.load(dsum_ptr + (pid_b * DIM + offs_d) * NCHUNK + c, mask=offs_d < DIM, other=0.0)
        s = tl.exp(A * dsum[:, None]) * s + tl.load(local_ptr + ptrs, mask=mask_dn, other=0.0)


@triton.jit
def _fwd_chunk_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, start_ptr, y_ptr, final_ptr, sub_ptr,
    L, DIM, N, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Scan one chunk from its start state (start: (b, d, chunks, n)); write y (contiguous (b, d, l)), the final state
    (last chunk) and, when SAVE, the state at each tile start -> sub (b, d, NSUB, n)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = _load_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
    Dv = _load_vector(D_ptr, offs_d, mask_d, HAS_D)
    h = tl.load(start_ptr + _state_ptrs(pid_b, offs_d, pid_c, offs_n, DIM, NCHUNK, N), mask=mask_dn, other=0.0)
    for j in range(pid_c * SUBS, tl.minimum((pid_c + 1) * SUBS, NSUB)):
        if SAVE:
            tl.store(sub_ptr + _state_ptrs(pid_b, offs_d, j, offs_n, DIM, NSUB, N), h, mask=mask_dn)
        offs_t = j * BLOCK_T + offs_t0
        mask = mask_d[:, None] & (offs_t < L)[None, :]
        delta, _ = _load_delta(dt_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sdt_b, sdt_d, sdt_l), mask, bias[:, None],
                               SOFTPLUS)
        u = tl.load(u_ptr + _tile_ptrs(pid_b, offs_d, offs_t, su_b, su_d, su_l), mask=mask, other=0.0).to(tl.float32)
        mask_tn = (offs_t < L)[:, None] & (offs_n < N)[None, :]
        B = tl.load(B_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sB_b, sB_n, sB_l), mask=mask_tn, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sC_b, sC_n, sC_l), mask=mask_tn, other=0.0).to(tl.float32)
        dA = tl.exp(delta[:, :, None] * A[:, None, :])
        P, hl = tl.associative_scan((dA, (delta * u)[:, :, None] * B[None, :, :]), 1, _combine)
        hs = hl + P * h[:, None, :]
        y = tl.sum(hs * C[None, :, :], axis=2) + Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sz_b, sz_d, sz_l), mask=mask, other=0.0)
            z = z.to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_ptr + _tile_ptrs(pid_b, offs_d, offs_t, DIM * L, L, 1), y.to(y_ptr.dtype.element_ty), mask=mask)
        h = _pick(hs, offs_t0, BLOCK_T - 1)
    if pid_c == NCHUNK - 1:
        tl.store(final_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernels


@triton.jit
def _bwd_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, local_ptr, dsum_ptr,
    L, DIM, N, SUBS, NSUB, NCHUNK,
    sdt_b, sdt_d, sdt_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l, sdy_b, sdy_d, sdy_l,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per chunk, with nothing flowing in from the right: the adjoint at the chunk's first step -> local
    (b, d, chunks, n), and the sum of Δ_{t+1} over the chunk's steps t -> dsum (b, d, chunks)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = _load_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
    g = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dsum = tl.zeros((BLOCK_D,), tl.float32)
    first = pid_c * SUBS
    for i in range(tl.minimum(SUBS, NSUB - first)):
        offs_t = (tl.minimum(first + SUBS, NSUB) - 1 - i) * BLOCK_T + offs_t0
        mask = mask_d[:, None] & (offs_t < L)[None, :]
        mask_next = mask_d[:, None] & (offs_t + 1 < L)[None, :]
        delta_next, _ = _load_delta(dt_ptr + _tile_ptrs(pid_b, offs_d, offs_t + 1, sdt_b, sdt_d, sdt_l), mask_next,
                                    bias[:, None], SOFTPLUS)
        dy = tl.load(dy_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sdy_b, sdy_d, sdy_l), mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sz_b, sz_d, sz_l), mask=mask, other=0.0)
            z = z.to(tl.float32)
            dy *= z * tl.sigmoid(z)
        mask_tn = (offs_t < L)[:, None] & (offs_n < N)[None, :]
        C = tl.load(C_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sC_b, sC_n, sC_l), mask=mask_tn, other=0.0).to(tl.float32)
        alpha = tl.exp(delta_next[:, :, None] * A[:, None, :])
        Q, gl = tl.associative_scan((alpha, dy[:, :, None] * C[None, :, :]), 1, _combine, reverse=True)
        g = _pick(gl + Q * g[:, None, :], offs_t0, 0)
        dsum += tl.sum(delta_next, axis=1)
    tl.store(local_ptr + _state_ptrs(pid_b, offs_d, pid_c, offs_n, DIM, NCHUNK, N), g, mask=mask_dn)
    tl.store(dsum_ptr + (pid_b * DIM + offs_d) * NCHUNK + pid_c, dsum, mask=mask_d)


@triton.jit
def _bwd_chunk_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, sub_ptr, carry_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, N, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
    sdy_b, sdy_d, sdy_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of one chunk, tiles last to first, from the adjoint flowing in from the right (carry: (b, d, c, n)).

    Writes du, dΔ, dz (contiguous (b, d, l)); adds into dB, dC (fp32 (b, n, l)); writes per-(batch, chunk) partial
    sums dA (b, c, d, n), dD and dΔ-bias (b, c, d); and dh0 (b, d, n) from chunk 0.
    """
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = _load_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
    Dv = _load_vector(D_ptr, offs_d, mask_d, HAS_D)
    g = tl.load(carry_ptr + _state_ptrs(pid_b, offs_d, pid_c, offs_n, DIM, NCHUNK, N), mask=mask_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    first = pid_c * SUBS
    for i in range(tl.minimum(SUBS, NSUB - first)):
        j = tl.minimum(first + SUBS, NSUB) - 1 - i
        offs_t = j * BLOCK_T + offs_t0
        mask = mask_d[:, None] & (offs_t < L)[None, :]
        mask_tn = (offs_t < L)[:, None] & (offs_n < N)[None, :]
        delta, raw = _load_delta(dt_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sdt_b, sdt_d, sdt_l), mask, bias[:, None],
                                 SOFTPLUS)
        delta_next, _ = _load_delta(dt_ptr + _tile_ptrs(pid_b, offs_d, offs_t + 1, sdt_b, sdt_d, sdt_l),
                                    mask_d[:, None] & (offs_t + 1 < L)[None, :], bias[:, None], SOFTPLUS)
        u = tl.load(u_ptr + _tile_ptrs(pid_b, offs_d, offs_t, su_b, su_d, su_l), mask=mask, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sB_b, sB_n, sB_l), mask=mask_tn, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + _bc_ptrs(pid_b, offs_n, offs_t, sC_b, sC_n, sC_l), mask=mask_tn, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sdy_b, sdy_d, sdy_l), mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        # States of this tile, recomputed from the saved state at its start.
        h0 = tl.load(sub_ptr + _state_ptrs(pid_b, offs_d, j, offs_n, DIM, NSUB, N), mask=mask_dn, other=0.0)
        dBu = (delta * u)[:, :, None] * B[None, :, :]
        P, hl = tl.associative_scan((tl.exp(delta[:, :, None] * A[:, None, :]), dBu), 1, _combine)
        hs = hl + P * h0[:, None, :]
        if HAS_Z:
            z = tl.load(z_ptr + _tile_ptrs(pid_b, offs_d, offs_t, sz_b, sz_d, sz_l), mask=mask, other=0.0)
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(hs * C[None, :, :], axis=2) + Dv[:, None] * u
            dz = dy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + _tile_ptrs(pid_b, offs_d, offs_t, DIM * L, L, 1), dz.to(dz_ptr.dtype.element_ty),
                     mask=mask)
            dy *= z * sig
        # Adjoint g_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1}, continuing the one from the right.
        alpha = tl.exp(delta_next[:, :, None] * A[:, None, :])
        Q, gl = tl.associative_scan((alpha, dy[:, :, None] * C[None, :, :]), 1, _combine, reverse=True)
        gs = gl + Q * g[:, None, :]
        g = _pick(gs, offs_t0, 0)
        t_ptrs = pid_b * N * L + offs_n[None, :] * L + offs_t[:, None]
        # Relaxed: only the sums after the kernel matter, no ordering with other memory operations.
        tl.atomic_add(dC_ptr + t_ptrs, tl.sum(dy[:, :, None] * hs, axis=0), mask=mask_tn, sem="relaxed")
        tl.atomic_add(dB_ptr + t_ptrs, tl.sum(gs * (delta * u)[:, :, None], axis=0), mask=mask_tn, sem="relaxed")
        gB = tl.sum(gs * B[None, :, :], axis=2)
        gh = gs * (hs - dBu)  # g_t exp(Δ_t A) h_{t-1}
        ddelta = tl.sum(gh * A[:, None, :], axis=2) + u * gB
        if SOFTPLUS:
            ddelta *= tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddelta = tl.where(mask, ddelta, 0.0)
        du = delta * gB + Dv[:, None] * dy
        dA_acc += tl.sum(gh * delta[:, :, None], axis=1)
        dD_acc += tl.sum(dy * u, axis=1)
        dbias_acc += tl.sum(ddelta, axis=1)
        out_ptrs = _tile_ptrs(pid_b, offs_d, offs_t, DIM * L, L, 1)
        tl.store(du_ptr + out_ptrs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddt_ptr + out_ptrs, ddelta.to(ddt_ptr.dtype.element_ty), mask=mask)
    part = (pid_b * NCHUNK + pid_c) * DIM + offs_d
    tl.store(dA_ptr + part[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
    tl.store(dD_ptr + part, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)
    if pid_c == 0:  # dh0 = exp(Δ_0 A) g_0
        delta0, _ = _load_delta(dt_ptr + pid_b * sdt_b + offs_d * sdt_d, mask_d, bias, SOFTPLUS)
        dh0 = tl.exp(delta0[:, None] * A) * g
        tl.store(dh0_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], dh0, mask=mask_dn)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers


class _Plan(NamedTuple):
    """How one pass cuts the work: channels per program, tiles per chunk, chunks, and the kernels' block sizes."""

    d_blocks: int
    nsub: int  # tiles of _T steps
    subs: int  # tiles per chunk
    nchunk: int
    sizes: dict  # BLOCK_D, BLOCK_T, BLOCK_N, num_warps


def _plan(b: int, d: int, l: int, n: int, tile: dict, device: torch.device) -> _Plan:
    """Channels per program from the tile budget (a (BLOCK_D, _T, BLOCK_N) fp32 tile of tile["elements"]); chunks:
    1 when batch x channel blocks fill the GPU, else enough for _CHUNKED_PROGRAMS_PER_SM programs per SM."""
    block_n = triton.next_power_of_2(n)
    block_d = max(1, tile["elements"] // (_T * block_n))
    d_blocks, nsub = triton.cdiv(d, block_d), triton.cdiv(l, _T)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    nchunk = _num_chunks(b * d_blocks, sms)
    subs = max(1, triton.cdiv(nsub, min(nchunk, max(nsub, 1))))
    sizes = dict(BLOCK_D=block_d, BLOCK_T=_T, BLOCK_N=block_n, num_warps=tile["warps"])
    return _Plan(d_blocks, nsub, subs, max(1, triton.cdiv(nsub, subs)), sizes)


def _num_chunks(programs: int, sms: int) -> int:
    """Chunks per sequence for ``programs`` (batch x channel blocks) on ``sms`` SMs (capped by the tile count)."""
    if programs >= _UNCHUNKED_PROGRAMS_PER_SM * sms:
        return 1
    return triton.cdiv(_CHUNKED_PROGRAMS_PER_SM * sms, programs)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride())


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise KernelInputError(
            f"selective_scan needs u (b, d, l) and A (d, n), got {tuple(u.shape)} and {tuple(A.shape)}"
        )
    b, d, l = u.shape
    n = A.shape[1]
    check_runnable(u.device)
    for name, t, shape in (
        ("u", u, (b, d, l)), ("delta", delta, (b, d, l)), ("A", A, (d, n)), ("B", B, (b, n, l)), ("C", C, (b, n, l)),
        ("D", D, (d,)), ("z", z, (b, d, l)), ("delta_bias", delta_bias, (d,)),
        ("initial_state", initial_state, (b, d, n)),
    ):
        check_tensor(name, t, shape, u.device)
    if n > 256:
        raise KernelInputError(f"selective_scan supports d_state up to 256, got {n}")


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states):
    """Launch the forward. Returns y (b, d, l) in u's dtype, final state (b, d, n) fp32, and the state at each tile
    start (b, d, cdiv(l, _T), n) fp32 when ``save_states`` (else (b, d, 0, n))."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    h0 = torch.zeros(b, d, n, **f32) if initial_state is None else initial_state.to(torch.float32).contiguous()
    y = torch.empty(b, d, l, dtype=u.dtype, device=u.device)
    p = _plan(b, d, l, n, _FWD_TILE, u.device)
    sub = torch.empty(b, d, p.nsub if save_states else 0, n, **f32)
    if l == 0:
        return y, h0.clone(), sub
    grid, dims = (p.d_blocks, p.nchunk, b), (l, d, n, p.subs, p.nsub, p.nchunk)
    start = h0.view(b, d, 1, n)
    if p.nchunk > 1:
        local, dsum = torch.empty(b, d, p.nchunk, n, **f32), torch.empty(b, d, p.nchunk, **f32)
        _fwd_local_kernel[grid](
            u, delta, A, B, delta_bias, local, dsum, *dims, *u.stride(), *delta.stride(), *B.stride(),
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **p.sizes,
        )
        start = torch.empty(b, d, p.nchunk, n, **f32)
        _carry_kernel[(p.d_blocks, b)](A, h0, local, dsum, start, d, n, p.nchunk, REVERSE=False,
                                       BLOCK_D=p.sizes["BLOCK_D"], BLOCK_N=p.sizes["BLOCK_N"])
    final = torch.empty(b, d, n, **f32)
    _fwd_chunk_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, start, y, final, sub, *dims,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE=save_states, **p.sizes,
    )
    return y, final, sub


def _adjoint_carry(p: _Plan, b, dy, gfinal, delta, A, C, z, delta_bias, flags) -> torch.Tensor:
    """The adjoint flowing into each chunk from its right: (b, d, chunks, n) fp32 (gfinal itself for one chunk)."""
    _, d, l = delta.shape
    n = A.shape[1]
    if p.nchunk == 1:
        return gfinal.view(b, d, 1, n)
    f32 = dict(dtype=torch.float32, device=delta.device)
    local, dsum = torch.empty(b, d, p.nchunk, n, **f32), torch.empty(b, d, p.nchunk, **f32)
    _bwd_local_kernel[(p.d_blocks, p.nchunk, b)](
        delta, A, C, z, delta_bias, dy, local, dsum, l, d, n, p.subs, p.nsub, p.nchunk,
        *delta.stride(), *C.stride(), *_strides(z), *dy.stride(), **flags, **p.sizes,
    )
    carry = torch.empty(b, d, p.nchunk, n, **f32)
    _carry_kernel[(p.d_blocks, b)](A, gfinal, local, dsum, carry, d, n, p.nchunk, REVERSE=True,
                                   BLOCK_D=p.sizes["BLOCK_D"], BLOCK_N=p.sizes["BLOCK_N"])
    return carry


def _scan_bwd(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sub):
    """Launch the backward. Returns du, dΔ, dz (b, d, l) in their inputs' dtypes (dz empty without z); and in fp32
    dA (d, n), dB, dC (b, n, l), dD, dΔ-bias (d,) and dh0 (b, d, n)."""
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    p = _plan(b, d, l, n, _BWD_TILE, u.device)
    if sub.shape != (b, d, p.nsub, n):
        raise KernelInputError("selective_scan backward needs the tile states saved by a forward with save_states")
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    gfinal = torch.zeros(b, d, n, **f32) if dfinal is None else dfinal.to(torch.float32).contiguous()
    du = torch.empty(b, d, l, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(b, d, l, dtype=delta.dtype, device=u.device)
    dz = torch.empty(b, d, l, dtype=z.dtype, device=u.device) if z is not None else torch.empty(0, **f32)
    dB, dC = torch.zeros(b, n, l, **f32), torch.zeros(b, n, l, **f32)
    if l == 0:
        return du, ddelta, torch.zeros(d, n, **f32), dB, dC, torch.zeros(d, **f32), dz, torch.zeros(d, **f32), gfinal
    carry = _adjoint_carry(p, b, dy, gfinal, delta, A, C, z, delta_bias, flags)
    dA_part, dD_part, dbias_part = (torch.empty(b, p.nchunk, d, *extra, **f32) for extra in ((n,), (), ()))
    dh0 = torch.empty(b, d, n, **f32)
    _bwd_chunk_kernel[(p.d_blocks, p.nchunk, b)](
        u, delta, A, B, C, D, z, delta_bias, dy, sub, carry,
        du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part, dh0, l, d, n, p.subs, p.nsub, p.nchunk,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z), *dy.stride(),
        HAS_D=D is not None, **flags, **p.sizes,
    )
    return du, ddelta, dA_part.sum((0, 1)), dB, dC, dD_part.sum((0, 1)), dz, dbias_part.sum((0, 1)), dh0


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops and the public function


@torch.library.custom_op("mamba_kernels::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    z: torch.Tensor | None, delta_bias: torch.Tensor | None, delta_softplus: bool, initial_state: torch.Tensor | None,
    save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states):
    b, d, l = u.shape
    n = A.shape[1]
    nsub = (l + _T - 1) // _T if save_states else 0
    return (u.new_empty(b, d, l), u.new_empty(b, d, n, dtype=torch.float32),
            u.new_empty(b, d, nsub, n, dtype=torch.float32))


@torch.library.custom_op("mamba_kernels::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(
    dy: torch.Tensor, dfinal: torch.Tensor | None, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
    delta_softplus: bool, sub: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    return _scan_bwd(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sub)


@_scan_bwd_op.register_fake
def _(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sub):
    b, d, l = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32)
    dz = z.new_empty(b, d, l) if z is not None else u.new_empty(0, **f32)
    return (u.new_empty(b, d, l), delta.new_empty(b, d, l), u.new_empty(d, n, **f32), u.new_empty(b, n, l, **f32),
            u.new_empty(b, n, l, **f32), u.new_empty(d, **f32), dz, u.new_empty(d, **f32), u.new_empty(b, d, n, **f32))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, _ = inputs
    ctx.delta_softplus = delta_softplus
    ctx.optional = (D is not None, z is not None, delta_bias is not None,
                    None if initial_state is None else initial_state.dtype)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])


def _backward(ctx, dy, dfinal, _dsub):
    u, delta, A, B, C, D, z, delta_bias, sub = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _scan_bwd_op(
        dy, dfinal, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, sub
    )
    has_D, has_z, has_bias, h0_dtype = ctx.optional
    return (
        du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.to(D.dtype) if has_D else None, dz if has_z else None, dbias.to(delta_bias.dtype) if has_bias else None,
        None, dh0.to(h0_dtype) if h0_dtype is not None else None, None,
    )


torch.library.register_autograd("mamba_kernels::selective_scan_fwd", _backward, setup_context=_setup_context)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton selective scan, differentiable in every tensor input; see :func:`mamba_export.ops.selective_scan_ref`.

    Args:
        u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); initial_state: (b, d, n).
            float32, float16 or bfloat16, any strides.

    Returns:
        y: (b, d, l) in u's dtype, and the final state h_l: (b, d, n) float32.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, final, _ = _scan_fwd_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save)
    return y, final
