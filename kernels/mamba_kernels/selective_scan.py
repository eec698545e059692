"""Selective scan (Mamba-1's S6) forward and backward in Triton, chunked over time.

Contract: :func:`selective_scan` has the signature, layouts and return values of
:func:`mamba_export.ops.selective_scan_ref` (channels before time; fp32 state arithmetic whatever the input dtype).

Recurrence, per channel d and state n (Δ after bias and softplus):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t;   y_t = (C_t . h_t + D u_t) silu(z_t)

How it runs. Each program holds the (BLOCK_D channels, N states) fp32 state of its channels in registers and steps
through time one token per iteration (a sequential recurrence, as the official CUDA kernel does within a thread:
one exp, two FMAs and the C.h reduction per state and step, the next step's inputs loaded while this one computes).
Time is cut into tiles of ``_T`` steps, and tiles into chunks, one program per (channel block, chunk, batch), so that
batch 1 at 64k tokens still fills the GPU:
    1. each chunk runs from a zero state: its local end state and sum of Δ      (_fwd_seq_kernel LOCAL, 1 chunk: skip)
    2. one short sequential pass carries states across chunks                  (_carry_kernel)
    3. each chunk runs again from its true start state, writes y, and saves the state at each tile start
                                                                               (_fwd_seq_kernel)
The backward runs the adjoint g_t = dL/dh_t, a reverse recurrence g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}, chunked
the same way (the local adjoint of each chunk: _bwd_local_kernel, an associative scan over register tiles; carry;
then _bwd_seq_kernel). _bwd_seq_kernel takes each tile last to first: it recomputes the tile's states forward from the
saved tile start state into a per-program scratch (_T x BLOCK_D x N fp32, cache-resident), then steps backward through
them. Memory beyond inputs and outputs is O(b d n l / _T), never the (b, d, l, n) states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import KernelInputError, check_runnable, check_tensor, contiguous_or_none
from ._triton_common import load_channel_vector, softplus

__all__ = ["selective_scan"]

_T = 32  # time steps per tile: the forward saves the state at each tile start, the backward recomputes a tile
# Programs of the sequential kernels: channels per program and warps (measured on H100, docs/kernels.md). The forward
# takes wider programs once it is chunked. The backward adds dB and dC into bc_groups partial sums (channel block i
# into i % bc_groups) and runs the chunked case's local adjoint (_bwd_local_kernel, register tiles of local_block_d
# channels x _T steps x N states) with local_warps. The backward chunks less than the forward ("chunking": unchunked
# from 1 program per SM, else 8 per SM): H100, b8 d1536 l2048 backward 3.8 ms unchunked against 4.8 ms in 11 chunks;
# b1 l65536 18.9 ms in 22 chunks against 18.7 ms in 88, with 66 MiB of scratch (64 KiB per program), not 270 MiB.
# The forward: 1 warp of 32 channels a program; at most 128 registers a thread (ptxas wants ~168 for the main pass,
# which then fits 12 warps an SM instead of 16); B_t and C_t prefetched into L1 16 steps ahead ("prefetch"; 0: off).
# H100, b8 d1536 l2048 bf16, 48 programs per SM: with B also loaded into registers a step ahead (dropped since),
# 0.522 ms with neither, 0.449 with the L1 prefetch, 0.439 with both; the code as it is: 0.474 with the prefetch and
# no register cap, 0.422 with both.
_FWD = {"block_d": 32, "chunked_block_d": 32, "warps": 1, "maxnreg": 128, "prefetch": 16}
_BWD = {"block_d": 32, "warps": 1, "bc_groups": 4, "local_block_d": 8, "local_warps": 4, "chunking": (1, 8)}
# Chunking costs a second pass over the sequence, so it is used only where batch x channel blocks give fewer than
# _UNCHUNKED_PROGRAMS_PER_SM programs per SM, and then cuts enough chunks for _CHUNKED_PROGRAMS_PER_SM. Forward on an
# H100 (bf16, d 1536, d_state 16) for targets 24/32/48/64 per SM: b8 l2048 0.474/0.432/0.422/0.448 ms, b1 l65536
# 1.793/1.634/1.619/1.692 ms (the backward has its own policy, _BWD["chunking"]).
_UNCHUNKED_PROGRAMS_PER_SM = 4
_CHUNKED_PROGRAMS_PER_SM = 48


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
    return tl.where(mask, softplus(raw, SOFTPLUS), 0.0), raw


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
    """Pointer offsets of a (BLOCK_D, BLOCK_N) slice [b, idx]^T of a contiguous (b, NIDX, n, d) state tensor."""
    return ((pid_b * NIDX + idx) * N + offs_n[None, :]) * DIM + offs_d[:, None]


@triton.jit
def _states_nd(pid_b, offs_n, offs_d, idx, DIM, NIDX, N):
    """Pointer offsets of a (BLOCK_N, BLOCK_D) slice [b, idx] of a contiguous (b, NIDX, n, d) state tensor."""
    return ((pid_b * NIDX + idx) * N + offs_n[:, None]) * DIM + offs_d[None, :]


@triton.jit
def _carry_kernel(
    A_ptr, init_ptr, local_ptr, dsum_ptr, out_ptr, DIM, N, NCHUNK,
    REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Carry a state across chunks: out[c] = s, then s = exp(A dsum[c]) s + local[c], from s = init.

    Forward (REVERSE False): out[c] is the state at the start of chunk c. Reverse: the chunks run last to first and
    out[c] is the adjoint flowing into chunk c from its right. init: contiguous (b, n, d); local, out: (b, c, n, d).
    """
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_dn = (offs_d < DIM)[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    s = tl.load(init_ptr + _state_ptrs(pid_b, offs_d, 0, offs_n, DIM, 1, N), mask=mask_dn, other=0.0)
    for i in range(NCHUNK):
        c = NCHUNK - 1 - i if REVERSE else i
        ptrs = _state_ptrs(pid_b, offs_d, c, offs_n, DIM, NCHUNK, N)
        tl.store(out_ptr + ptrs, s, mask=mask_dn)
        if i + 1 < NCHUNK:  # the last chunk's local state is never needed (nor computed, in the forward)
            dsum = tl.load(dsum_ptr + (pid_b * DIM + offs_d) * NCHUNK + c, mask=offs_d < DIM, other=0.0)
            s = tl.exp(A * dsum[:, None]) * s + tl.load(local_ptr + ptrs, mask=mask_dn, other=0.0)


@triton.jit
def _channel_loads(t, L, pid_b, offs_d, mask_d, u_ptr, dt_ptr, z_ptr, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
                   sz_b, sz_d, sz_l, HAS_Z: tl.constexpr):
    """The per-channel raw inputs of time step t (zeros past L): u, Δ, z (BLOCK_D,) (u again in place of z when
    HAS_Z is off)."""
    md = mask_d & (offs_d * 0 + t < L)
    u = tl.load(u_ptr + pid_b * su_b + offs_d * su_d + t * su_l, mask=md, other=0.0)
    dt = tl.load(dt_ptr + pid_b * sdt_b + offs_d * sdt_d + t * sdt_l, mask=md, other=0.0)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * sz_b + offs_d * sz_d + t * sz_l, mask=md, other=0.0)
    else:
        z = u
    return u, dt, z


@triton.jit
def _step_loads(t, L, pid_b, offs_d, mask_d, offs_n, mask_n, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr,
                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
                HAS_Z: tl.constexpr, LOCAL: tl.constexpr):
    """The raw inputs of time step t (zeros past L): u, Δ (BLOCK_D,), B, C (BLOCK_N,), z (BLOCK_D,).
    A LOCAL pass needs no C and z: it gets B and u in their place (never used)."""
    u, dt, z = _channel_loads(t, L, pid_b, offs_d, mask_d, u_ptr, dt_ptr, z_ptr, su_b, su_d, su_l, sdt_b, sdt_d,
                              sdt_l, sz_b, sz_d, sz_l, HAS_Z and not LOCAL)
    mn = mask_n & (offs_n * 0 + t < L)
    B = tl.load(B_ptr + pid_b * sB_b + offs_n * sB_n + t * sB_l, mask=mn, other=0.0)
    if LOCAL:
        C = B
    else:
        C = tl.load(C_ptr + pid_b * sC_b + offs_n * sC_n + t * sC_l, mask=mn, other=0.0)
    return u, dt, B, C, z


@triton.jit
def _fwd_group(tg, L, u_g, dt_g, z_g, mask_g, offs_k, su_l, sdt_l, sz_l, HAS_Z: tl.constexpr, U: tl.constexpr):
    """u, Δ and z of steps tg .. tg + U - 1 as (U, BLOCK_D) tiles (zeros unless the whole group lies within L: the
    caller clamps tg; only a sequence shorter than U has no whole group). The tiles are time first, so that each lane
    holds its channel's U steps in registers (u: one vector load a lane)."""
    m = (offs_k[:, None] * 0 + tg + U) <= L
    m = m if mask_g is None else m & mask_g
    ug = tl.load(u_g + tg * su_l, mask=m, other=0.0)
    dg = tl.load(dt_g + tg * sdt_l, mask=m, other=0.0)
    zg = tl.load(z_g + tg * sz_l, mask=m, other=0.0) if HAS_Z else dg
    return ug, dg, zg


@triton.jit
def _row(tile, offs_k, k: tl.constexpr):
    """Row k of a (U, BLOCK_D) tile whose rows a lane holds in registers, in fp32: folds to a register read."""
    return tl.sum(tl.where(offs_k[:, None] == k, tile.to(tl.float32), -0.0), axis=0)


@triton.jit
def _fwd_step(t, L, u, raw, z, Bt, Ct, h, dsum, A, bias, Dv, mask_d, y_ptrs, DIM,
              HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, LOCAL: tl.constexpr, FAST: tl.constexpr):
    """One step of the forward recurrence from its inputs (u, raw Δ, z fp32 (BLOCK_D,); B_t, C_t broadcast tiles);
    a step past L leaves h alone (Δ = 0) and writes nothing. Returns the new h and Σ Δ."""
    live = mask_d & (u * 0.0 + t < L)
    dt = tl.where(live, softplus(raw + bias, SOFTPLUS, FAST), 0.0)
    h = tl.exp2(dt[:, None, None] * A) * h + Bt.to(tl.float32) * (dt * u)[:, None, None]
    if LOCAL:
        dsum += dt
    else:
        y = tl.sum(tl.sum(h * Ct.to(tl.float32), axis=2), axis=1) + Dv * u
        if HAS_Z:
            y *= z * tl.sigmoid(z)
        tl.store(y_ptrs + t * DIM, y.to(y_ptrs.dtype.element_ty), mask=live)
    return h, dsum


@triton.jit
def _prefetch_l1(ptrs):
    """prefetch.global.L1 of each lane's address (GPU only: inline PTX)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global.L1 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _load_or_zero(ptrs, mask):
    """tl.load, with zeros where ``mask`` is off; no mask at all when ``mask`` is None."""
    if mask is None:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit(do_not_specialize=["su_d", "sdt_d", "sz_d", "sy_d", "s_one"])
def _fwd_seq_kernel(
    u_ptr, dt_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, start_ptr, y_ptr, final_ptr, sub_ptr,
    L, DIM, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_l, sC_b, sC_l, sz_b, sz_d, sz_l, sy_d, s_one,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
    LOCAL: tl.constexpr, FAST: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    N: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, U: tl.constexpr, PF: tl.constexpr,
):
    """One chunk of the forward as a sequential recurrence, one time step after the other. Each thread owns one channel
    and holds its BLOCK_N fp32 states in registers, as a (BLOCK_D, BLOCK_N // G, G) tile: the channels across the
    lanes, the states in groups of G (16 bytes of B_t or C_t: one vector load each). So the per-channel work
    (softplus, the gate, the loads of u, Δ, z and the store of y) is done once per channel, and C.h is summed inside
    the thread: a step costs per state one multiply (Δ A), one exp2, one multiply and one FMA (the update) and one
    FMA (C.h), with no shuffles and no shared memory.

    The layout is chosen by what Triton can see: B and C must be n-contiguous (``sB_n == sC_n == 1``, the groups of
    G are then vector loads), and every channel-indexed address is multiplied by a stride Triton may not specialise
    (``s_one`` is 1 at run time), so that its coalescing pass does not re-lay the channels to vectorise along them
    (with the channels' unit strides visible it gives each thread 4 channels x 4 states, and each step pays shuffles
    and shared-memory round trips: docs/kernels.md).

    States in memory are (b, index, n, d), channels contiguous. LOCAL: from a zero state, write the chunk's end
    state to final_ptr as (b, chunks, n, d) and its sum of Δ to sub_ptr as (b, d, chunks). Otherwise: from the
    chunk's start state (start: (b, chunks, n, d)) write y (time-major, (b, l, d) memory), the final state (last
    chunk, (b, n, d)) and, when SAVE, the state at each tile start -> sub (b, NSUB, n, d).
    """
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    n3 = tl.arange(0, BLOCK_N // G)[None, :, None] * G + tl.arange(0, G)[None, None, :]  # (1, groups, G)
    d3 = offs_d[:, None, None] * s_one  # (BLOCK_D, 1, 1)
    mask3 = mask_d[:, None, None] & (n3 < N)
    A = tl.load(At_ptr + n3 * DIM + d3, mask=mask3, other=0.0).to(tl.float32) * 1.4426950408889634  # exp2 scale
    bias = load_channel_vector(bias_ptr, offs_d * s_one, mask_d, HAS_BIAS)
    Dv = load_channel_vector(D_ptr, offs_d * s_one, mask_d, HAS_D)
    if LOCAL:
        h = tl.zeros((BLOCK_D, BLOCK_N // G, G), tl.float32)
    else:
        h = tl.load(start_ptr + ((pid_b * NCHUNK + pid_c) * N + n3) * DIM + d3, mask=mask3, other=0.0)
    dsum = tl.zeros((BLOCK_D,), tl.float32)
    bn = n3 + d3 * 0  # B_t, C_t broadcast over the channels
    mask_bn = (bn < N) if N != BLOCK_N else None
    mask_ld = None if EVEN_D else mask_d
    u_ptrs = u_ptr + pid_b * su_b + offs_d * su_d
    dt_ptrs = dt_ptr + pid_b * sdt_b + offs_d * sdt_d
    z_ptrs = z_ptr + pid_b * sz_b + offs_d * sz_d if HAS_Z else u_ptrs
    y_ptrs = y_ptr + pid_b * L * DIM + offs_d * sy_d
    B_ptrs = B_ptr + pid_b * sB_b + bn
    C_ptrs = C_ptr + pid_b * sC_b + bn
    j0 = pid_c * SUBS
    j1 = tl.minimum(j0 + SUBS, NSUB)
    # The sequences are read U steps at a time, a group ahead (loop-carried, so that ptxas cannot sink the loads to
    # their use): u, Δ and z as (U, BLOCK_D) tiles, each lane holding its channel's U steps (u is channel-major: one
    # vector load a lane instead of a cache line a lane and step). The U steps of a group are unrolled, so a step's
    # row of the tiles is a register. B_t and C_t (the same for every channel) are loaded in their step, from L1:
    # each step prefetches the rows PF steps ahead (without it, their L2 latency was most of the main pass's stalls).
    # The last L % U steps (in the last chunk) run one at a time after the groups.
    offs_k = tl.arange(0, U)
    if U > 1:  # the launcher checked that each lane's rows of U steps are 16-byte aligned: u[b, d, t:t+U] contiguous
        u_g = u_ptr + tl.multiple_of(pid_b * su_b + offs_d * su_d, U)[None, :] + offs_k[:, None]
    else:
        u_g = u_ptrs[None, :] + offs_k[:, None] * su_l
    dt_g = dt_ptrs[None, :] + offs_k[:, None] * sdt_l
    z_g = z_ptrs[None, :] + offs_k[:, None] * sz_l
    mask_g = None if EVEN_D else mask_d[None, :] & (offs_k[:, None] >= 0)
    l_groups = L - L % U
    t_first = j0 * BLOCK_T
    grp = _fwd_group(tl.multiple_of(tl.minimum(t_first, tl.maximum(l_groups - U, 0)), U), L, u_g, dt_g, z_g, mask_g,
                     offs_k, su_l, sdt_l, sz_l, HAS_Z and not LOCAL, U)
    B_row = B_ptr + pid_b * sB_b + offs_d * 0
    C_row = C_ptr + pid_b * sC_b + offs_d * 0
    for j in range(j0, j1):
        if SAVE:
            tl.store(sub_ptr + ((pid_b * NSUB + j) * N + n3) * DIM + d3, h, mask=mask3)
        for t0 in range(j * BLOCK_T, tl.minimum(j * BLOCK_T + BLOCK_T, l_groups), U):
            ug, dg, zg = grp
            grp = _fwd_group(tl.multiple_of(tl.minimum(t0 + U, tl.maximum(l_groups - U, 0)), U), L, u_g, dt_g, z_g,
                             mask_g, offs_k, su_l, sdt_l, sz_l, HAS_Z and not LOCAL, U)
            for k in tl.static_range(U):
                if PF > 0:  # B_t and C_t rows PF steps ahead into L1 (their loads below then hit it)
                    tp = tl.minimum(t0 + k + PF, L - 1)
                    _prefetch_l1(B_row + tp * sB_l)
                    if not LOCAL:
                        _prefetch_l1(C_row + tp * sC_l)
                Bt = _load_or_zero(B_ptrs + (t0 + k) * sB_l, mask_bn)
                Ct = Bt if LOCAL else _load_or_zero(C_ptrs + (t0 + k) * sC_l, mask_bn)
                h, dsum = _fwd_step(t0 + k, L, _row(ug, offs_k, k), _row(dg, offs_k, k), _row(zg, offs_k, k), Bt, Ct,
                                    h, dsum, A, bias, Dv, mask_d, y_ptrs, DIM, HAS_Z, SOFTPLUS, LOCAL, FAST)
    for t in range(tl.maximum(l_groups, t_first), tl.minimum(j1 * BLOCK_T, L)):
        u = _load_or_zero(u_ptrs + t * su_l, mask_ld).to(tl.float32)
        raw = _load_or_zero(dt_ptrs + t * sdt_l, mask_ld).to(tl.float32)
        z = _load_or_zero(z_ptrs + t * sz_l, mask_ld).to(tl.float32) if HAS_Z and not LOCAL else u
        Bt = _load_or_zero(B_ptrs + t * sB_l, mask_bn)
        Ct = Bt if LOCAL else _load_or_zero(C_ptrs + t * sC_l, mask_bn)
        h, dsum = _fwd_step(t, L, u, raw, z, Bt, Ct, h, dsum, A, bias, Dv, mask_d, y_ptrs, DIM, HAS_Z, SOFTPLUS,
                            LOCAL, FAST)
    if LOCAL:
        tl.store(final_ptr + ((pid_b * NCHUNK + pid_c) * N + n3) * DIM + d3, h, mask=mask3)
        tl.store(sub_ptr + (pid_b * DIM + offs_d * s_one) * NCHUNK + pid_c, dsum, mask=mask_d)
    elif pid_c == NCHUNK - 1:
        tl.store(final_ptr + (pid_b * N + n3) * DIM + d3, h, mask=mask3)


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
    (b, chunks, n, d), and the sum of Δ_{t+1} over the chunk's steps t -> dsum (b, d, chunks)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t0 = tl.arange(0, BLOCK_T)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    bias = load_channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
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
def _bwd_seq_kernel(
    u_ptr, dt_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, sub_ptr, carry_ptr, scratch_ptr,
    du_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, N, SUBS, NSUB, NCHUNK, DBLOCKS, GROUPS,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l, sz_b, sz_d, sz_l,
    sdy_b, sdy_d, sdy_l, sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of one chunk as sequential recurrences, tiles last to first, states as (BLOCK_N, BLOCK_D) tiles
    (channels across lanes, as in the forward). Per tile: the states are recomputed forward from the tile's saved
    start state into this program's scratch (BLOCK_T, BLOCK_N, BLOCK_D) fp32, then a reverse loop runs the adjoint
    g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1} from the adjoint flowing in from the right (carry: (b, chunks, n, d)).

    Writes du, dΔ, dz in their given strides; adds dB, dC into GROUPS partial sums (b, GROUPS, l, n) (channel
    block i into group i % GROUPS, relaxed fp32 atomics); per-(batch, chunk) partial sums dA (b, c, d, n), dD and
    dΔ-bias (b, c, d); and dh0 (b, n, d) from chunk 0.
    """
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < DIM, offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A = tl.load(At_ptr + offs_n[:, None] * DIM + offs_d[None, :], mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = load_channel_vector(bias_ptr, offs_d, mask_d, HAS_BIAS)
    Dv = load_channel_vector(D_ptr, offs_d, mask_d, HAS_D)
    prog = (pid_b * NCHUNK + pid_c) * DBLOCKS + pid_d
    local_nd = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    scratch = scratch_ptr + prog * (BLOCK_T * BLOCK_N * BLOCK_D) + local_nd
    g = tl.load(carry_ptr + _states_nd(pid_b, offs_n, offs_d, pid_c, DIM, NCHUNK, N), mask=mask_nd, other=0.0)
    j0 = pid_c * SUBS
    j1 = tl.minimum(j0 + SUBS, NSUB)
    t_end = tl.minimum(j1 * BLOCK_T, L)
    # exp(Δ_{t+1} A) for the chunk's last step t (Δ is 0 past the sequence).
    _, raw_next, _, _, _ = _step_loads(t_end, L, pid_b, offs_d, mask_d, offs_n, mask_n, u_ptr, dt_ptr, B_ptr, C_ptr,
                                       z_ptr, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b, sC_n,
                                       sC_l, sz_b, sz_d, sz_l, HAS_Z, True)
    dt_next = softplus(raw_next.to(tl.float32) + bias, SOFTPLUS)
    dt_next = tl.where(mask_d & (offs_d * 0 + t_end < L), dt_next, 0.0)
    alpha = tl.exp2(dt_next[None, :] * A2)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(j1 - j0):
        j = j1 - 1 - i
        t0 = j * BLOCK_T
        t1 = tl.minimum(t0 + BLOCK_T, L)
        h_start = tl.load(sub_ptr + _states_nd(pid_b, offs_n, offs_d, j, DIM, NSUB, N), mask=mask_nd, other=0.0)
        # Forward over the tile: h_t -> scratch[t - t0].
        h = h_start
        for t in range(t0, t1):
            u, raw, Bt, _, _ = _step_loads(t, L, pid_b, offs_d, mask_d, offs_n, mask_n, u_ptr, dt_ptr, B_ptr, C_ptr,
                                           z_ptr, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l, sC_b,
                                           sC_n, sC_l, sz_b, sz_d, sz_l, HAS_Z, True)
            dt = tl.where(mask_d, softplus(raw.to(tl.float32) + bias, SOFTPLUS), 0.0)
            h = tl.exp2(dt[None, :] * A2) * h + Bt.to(tl.float32)[:, None] * (dt * u.to(tl.float32))[None, :]
            tl.store(scratch + (t - t0) * (BLOCK_N * BLOCK_D), h)
        tl.debug_barrier()
        # Backward over the tile, last step first; h_cur = h_t.
        h_cur = h
        for k in range(t1 - t0):
            t = t1 - 1 - k
            s = t - t0
            prev = tl.load(scratch + (s - 1) * (BLOCK_N * BLOCK_D), mask=(local_nd * 0 + s) > 0, other=0.0)
            h_prev = tl.where(s > 0, prev, h_start)
            u, raw, Bt, Ct, z = _step_loads(t, L, pid_b, offs_d, mask_d, offs_n, mask_n, u_ptr, dt_ptr, B_ptr,
                                            C_ptr, z_ptr, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_n, sB_l,
                                            sC_b, sC_n, sC_l, sz_b, sz_d, sz_l, HAS_Z, False)
            dy = tl.load(dy_ptr + pid_b * sdy_b + offs_d * sdy_d + t * sdy_l, mask=mask_d, other=0.0).to(tl.float32)
            u = u.to(tl.float32)
            Bt = Bt.to(tl.float32)
            Ct = Ct.to(tl.float32)
            raw = raw.to(tl.float32) + bias
            dt = tl.where(mask_d, softplus(raw, SOFTPLUS), 0.0)
            if HAS_Z:
                zf = z.to(tl.float32)
                sig = tl.sigmoid(zf)
                y = tl.sum(h_cur * Ct[:, None], axis=0) + Dv * u
                dz = dy * y * sig * (1.0 + zf * (1.0 - sig))
                tl.store(dz_ptr + pid_b * sdz_b + offs_d * sdz_d + t * sdz_l, dz.to(dz_ptr.dtype.element_ty),
                         mask=mask_d)
                dy = dy * zf * sig
            g = Ct[:, None] * dy[None, :] + alpha * g
            dA_t = tl.exp2(dt[None, :] * A2)
            gh = g * dA_t * h_prev  # g_t exp(Δ_t A) h_{t-1}
            dtu = dt * u
            bc_ptrs = ((pid_b * GROUPS + pid_d % GROUPS) * L + t) * N + offs_n
            tl.atomic_add(dCp_ptr + bc_ptrs, tl.sum(h_cur * dy[None, :], axis=1), mask=mask_n, sem="relaxed")
            tl.atomic_add(dBp_ptr + bc_ptrs, tl.sum(g * dtu[None, :], axis=1), mask=mask_n, sem="relaxed")
            gB = tl.sum(g * Bt[:, None], axis=0)
            ddelta = tl.sum(gh * A, axis=0) + u * gB
            if SOFTPLUS:
                ddelta *= tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
            ddelta = tl.where(mask_d, ddelta, 0.0)
            du = dt * gB + Dv * dy
            dA_acc += gh * dt[None, :]
            dD_acc += dy * u
            dbias_acc += ddelta
            tl.store(du_ptr + pid_b * sdu_b + offs_d * sdu_d + t * sdu_l, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_ptr + pid_b * sddt_b + offs_d * sddt_d + t * sddt_l, ddelta.to(ddt_ptr.dtype.element_ty),
                     mask=mask_d)
            alpha = dA_t
            h_cur = h_prev
        tl.debug_barrier()
    part = (pid_b * NCHUNK + pid_c) * DIM + offs_d
    tl.store(dA_ptr + part[None, :] * N + offs_n[:, None], dA_acc, mask=mask_nd)
    tl.store(dD_ptr + part, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)
    if pid_c == 0:  # dh0 = exp(Δ_0 A) g_0
        tl.store(dh0_ptr + _states_nd(pid_b, offs_n, offs_d, 0, DIM, 1, N), alpha * g, mask=mask_nd)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers


class _Plan(NamedTuple):
    """How one pass cuts the work: channels per program, tiles per chunk, chunks, and the kernels' block sizes."""

    d_blocks: int
    nsub: int  # tiles of _T steps
    subs: int  # tiles per chunk
    nchunk: int
    sizes: dict  # BLOCK_D, BLOCK_T, BLOCK_N, num_warps


def _plan(b: int, d: int, l: int, n: int, block_d: int, warps: int, device: torch.device,
          policy: tuple[int, int] | None = None) -> _Plan:
    """Programs of ``block_d`` channels; chunks: 1 when batch x channel blocks fill the GPU, else enough for the
    target programs per SM. ``policy``: (unchunked, chunked) programs per SM, default (_UNCHUNKED_PROGRAMS_PER_SM,
    _CHUNKED_PROGRAMS_PER_SM)."""
    d_blocks, nsub = triton.cdiv(d, block_d), triton.cdiv(l, _T)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    nchunk = _num_chunks(b * d_blocks, sms, *(policy or ()))
    subs = max(1, triton.cdiv(nsub, min(nchunk, max(nsub, 1))))
    sizes = dict(BLOCK_D=block_d, BLOCK_T=_T, BLOCK_N=triton.next_power_of_2(n), num_warps=warps)
    return _Plan(d_blocks, nsub, subs, max(1, triton.cdiv(nsub, subs)), sizes)


def _num_chunks(programs: int, sms: int, unchunked_per_sm: int | None = None, chunked_per_sm: int | None = None) -> int:
    """Chunks per sequence for ``programs`` (batch x channel blocks) on ``sms`` SMs (capped by the tile count)."""
    if programs >= (unchunked_per_sm or _UNCHUNKED_PROGRAMS_PER_SM) * sms:
        return 1
    return triton.cdiv((chunked_per_sm or _CHUNKED_PROGRAMS_PER_SM) * sms, programs)


def _nd(state: torch.Tensor) -> torch.Tensor:
    """A (b, d, n) state as the kernels keep it: fp32 (b, n, d), channels contiguous."""
    return state.to(torch.float32).transpose(1, 2).contiguous()


def _u_group(u: torch.Tensor) -> int:
    """Steps of u the forward loads at once per channel: 16 bytes where every channel's row of them is contiguous
    and 16-byte aligned (channel-major u, as the model hands it over, with 16 bytes dividing the row stride), else 1."""
    vec = 16 // u.element_size()
    ok = u.stride(2) == 1 and u.stride(1) % vec == 0 and u.stride(0) % vec == 0 and u.data_ptr() % 16 == 0
    return vec if ok else 1


def _states_f32(t: torch.Tensor) -> torch.Tensor:
    """B or C (b, n, l) for the forward: fp32 with the states contiguous (time-major memory). The forward loads a
    step's states as 16-byte vectors and needs no conversions in its loop; B and C are 1/d of u's size."""
    if t.stride(1) != 1 and t.shape[1] != 1:
        return t.transpose(1, 2).to(torch.float32).contiguous().transpose(1, 2)
    return t.to(torch.float32)


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
    """Launch the forward. Returns y (b, d, l) in u's dtype (time-major in memory, a (b, l, d) buffer transposed, as
    out_proj wants it), the final state (b, d, n) fp32 (a (b, n, d) buffer transposed), and the state at each tile
    start (b, cdiv(l, _T), n, d) fp32 when ``save_states`` (else (b, 0, n, d))."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    h0 = torch.zeros(b, n, d, **f32) if initial_state is None else _nd(initial_state)
    y = torch.empty(b, l, d, dtype=u.dtype, device=u.device).transpose(1, 2)
    p = _plan(b, d, l, n, _FWD["block_d"], _FWD["warps"], u.device)
    if p.nchunk > 1:
        p = _plan(b, d, l, n, _FWD["chunked_block_d"], _FWD["warps"], u.device)
    sub = torch.empty(b, p.nsub if save_states else 0, n, d, **f32)
    if l == 0:
        return y, h0.transpose(1, 2), sub
    B, C = _states_f32(B), _states_f32(C)
    grid, dims = (p.d_blocks, p.nchunk, b), (l, d, p.subs, p.nsub, p.nchunk)
    strides = (*u.stride(), *delta.stride(), B.stride(0), B.stride(2), C.stride(0), C.stride(2), *_strides(z), 1, 1)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 FAST=u.device.type == "cuda", EVEN_D=d % p.sizes["BLOCK_D"] == 0, N=n,
                 G=min(p.sizes["BLOCK_N"], 4), U=_u_group(u))
    flags["PF"] = _FWD["prefetch"] if u.device.type == "cuda" else 0  # inline PTX: not under the interpreter
    if _FWD["maxnreg"] and u.device.type == "cuda":
        flags["maxnreg"] = _FWD["maxnreg"]
    start = h0.view(b, 1, n, d)
    At = A.t().contiguous()  # (n, d): states in memory are (states, channels)
    if p.nchunk > 1:
        local, dsum = torch.empty(b, p.nchunk, n, d, **f32), torch.empty(b, d, p.nchunk, **f32)
        # Local states of every chunk but the last (whose end state the main pass computes).
        _fwd_seq_kernel[(p.d_blocks, p.nchunk - 1, b)](u, delta, At, B, C, D, z, delta_bias, start, y, local, dsum,
                                                       *dims, *strides, **flags, SAVE=False, LOCAL=True, **p.sizes)
        start = torch.empty(b, p.nchunk, n, d, **f32)
        _carry_kernel[(p.d_blocks, b)](A, h0, local, dsum, start, d, n, p.nchunk, REVERSE=False,
                                       BLOCK_D=p.sizes["BLOCK_D"], BLOCK_N=p.sizes["BLOCK_N"])
    final = torch.empty(b, n, d, **f32)
    _fwd_seq_kernel[grid](u, delta, At, B, C, D, z, delta_bias, start, y, final, sub, *dims, *strides, **flags,
                          SAVE=save_states, LOCAL=False, **p.sizes)
    return y, final.transpose(1, 2), sub


def _adjoint_carry(p: _Plan, b, dy, gfinal, delta, A, C, z, delta_bias, flags) -> torch.Tensor:
    """The adjoint flowing into each chunk from its right: (b, chunks, n, d) fp32 (gfinal itself for one chunk)."""
    _, d, l = delta.shape
    n = A.shape[1]
    if p.nchunk == 1:
        return gfinal.view(b, 1, n, d)
    f32 = dict(dtype=torch.float32, device=delta.device)
    local, dsum = torch.empty(b, p.nchunk, n, d, **f32), torch.empty(b, d, p.nchunk, **f32)
    sizes = dict(p.sizes, BLOCK_D=_BWD["local_block_d"], num_warps=_BWD["local_warps"])
    d_blocks = triton.cdiv(d, sizes["BLOCK_D"])
    _bwd_local_kernel[(d_blocks, p.nchunk, b)](
        delta, A, C, z, delta_bias, dy, local, dsum, l, d, n, p.subs, p.nsub, p.nchunk,
        *delta.stride(), *C.stride(), *_strides(z), *dy.stride(), **flags, **sizes,
    )
    carry = torch.empty(b, p.nchunk, n, d, **f32)
    _carry_kernel[(d_blocks, b)](A, gfinal, local, dsum, carry, d, n, p.nchunk, REVERSE=True,
                                 BLOCK_D=sizes["BLOCK_D"], BLOCK_N=sizes["BLOCK_N"])
    return carry


def _scan_bwd(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sub):
    """Launch the backward. Returns du, dΔ, dz (b, d, l) in their inputs' dtypes and strides (dz empty without z);
    and in fp32 dA (d, n), dB, dC (b, n, l) (time-major in memory), dD, dΔ-bias (d,) and dh0 (b, d, n)."""
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    p = _plan(b, d, l, n, _BWD["block_d"], _BWD["warps"], u.device, _BWD["chunking"])
    if sub.shape != (b, p.nsub, n, d):
        raise KernelInputError("selective_scan backward needs the tile states saved by a forward with save_states")
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    gfinal = torch.zeros(b, n, d, **f32) if dfinal is None else _nd(dfinal)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else torch.empty(0, **f32)
    groups = min(p.d_blocks, _BWD["bc_groups"])
    dB_part, dC_part = torch.zeros(b, groups, l, n, **f32), torch.zeros(b, groups, l, n, **f32)
    if l == 0:
        dB, dC = dB_part.sum(1).transpose(1, 2), dC_part.sum(1).transpose(1, 2)
        return (du, ddelta, torch.zeros(d, n, **f32), dB, dC, torch.zeros(d, **f32), dz, torch.zeros(d, **f32),
                gfinal.transpose(1, 2))
    carry = _adjoint_carry(p, b, dy, gfinal, delta, A, C, z, delta_bias, flags)
    scratch = torch.empty(b * p.nchunk * p.d_blocks * _T * p.sizes["BLOCK_D"] * p.sizes["BLOCK_N"], **f32)
    dA_part, dD_part, dbias_part = (torch.empty(b, p.nchunk, d, *extra, **f32) for extra in ((n,), (), ()))
    dh0 = torch.empty(b, n, d, **f32)
    _bwd_seq_kernel[(p.d_blocks, p.nchunk, b)](
        u, delta, A.t().contiguous(), B, C, D, z, delta_bias, dy, sub, carry, scratch,
        du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
        l, d, n, p.subs, p.nsub, p.nchunk, p.d_blocks, groups,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z), *dy.stride(),
        *du.stride(), *ddelta.stride(), *_strides(dz if z is not None else None),
        HAS_D=D is not None, **flags, **p.sizes,
    )
    dB, dC = (part.sum(1).transpose(1, 2) for part in (dB_part, dC_part))
    return (du, ddelta, dA_part.sum((0, 1)), dB, dC, dD_part.sum((0, 1)), dz, dbias_part.sum((0, 1)),
            dh0.transpose(1, 2))


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
    return (u.new_empty(b, l, d).transpose(1, 2), u.new_empty(b, n, d, dtype=torch.float32).transpose(1, 2),
            u.new_empty(b, nsub, n, d, dtype=torch.float32))


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
    dz = torch.empty_like(z) if z is not None else u.new_empty(0, **f32)
    dBC = [u.new_empty(b, l, n, **f32).transpose(1, 2) for _ in range(2)]
    return (torch.empty_like(u), torch.empty_like(delta),
            u.new_empty(d, n, **f32), dBC[0], dBC[1], u.new_empty(d, **f32), dz, u.new_empty(d, **f32),
            u.new_empty(b, n, d, **f32).transpose(1, 2))


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
