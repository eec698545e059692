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
For d_state 16 the forward is _fwd_quad_kernel instead: 4 lanes a channel, each holding 4 of its states, so batch 8 x
1536 channels is 1536 warps and fills an H100 without chunks, in one pass (one exp per state and step); batch 1 at 64k
still chunks, in that layout.
The backward runs the adjoint g_t = dL/dh_t, a reverse recurrence g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}, chunked
the same way (the local adjoint of each chunk but the first: _bwd_local_kernel, a sequential reverse pass; carry;
then _bwd_seq_kernel), in the forward's layout (a lane per channel, its states and adjoints in registers).
_bwd_seq_kernel takes each tile last to first: it runs the tile forward from its saved start state, keeping the state
before each sub-tile of 4 steps and the sub-tile's per-step inputs (Δ after softplus, softplus', u, the gated dy and
the gate's derivative) in a per-program scratch (_T / 4 x (N + 20) x BLOCK_D fp32), then per sub-tile, last to first,
recomputes its 4 states into registers and steps the adjoint back through them. dB_t and dC_t, sums over the
channels, are a reduce-scatter over the lanes (shuffles) and one atomic add a lane and step.
For d_state 16 the backward is _bwd_quad_kernel instead: the 4-lane layout, a tile's states and per-step inputs in
registers (no scratch), dB_t and dC_t reduce-scattered over the warp's 8 channels and added with vector atomics.
Memory beyond inputs and outputs is O(b d n l / _T) and the scratch (18 KiB a program), never the (b, d, l, n) states.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (KernelInputError, check_row_offsets, check_runnable, check_tensor, contiguous_or_none,
                      empty_like_bdl)
from ._launch import cdiv, eager_function, fast_launch, next_power_of_2, pick, sm_count, wants_grad
from ._triton_common import lg2_approx, load_channel_vector, rcp_approx, sigmoid, silu, softplus

__all__ = ["selective_scan"]

_T = 16  # time steps per tile: the forward saves the state at each tile start, the backward recomputes a tile
# (H100 fwd+bwd, b1 d1536 l65536 bf16, same-run A/B: 6.57 ms at 32, 6.25 at 16, 6.60 at 8; b8 l2048: 1.69 -> 1.61 at
# 16 in a stable run. 16 halves the backward's scratch to 18 KiB a program, ~19 MB for the programs resident on an
# H100, which then stays in L2 (at 32, 38 MB did not, and its reloads stalled the main loop); the saved tile states
# double to 1/16 of the (b, d, l, n) states.)
# Programs of the sequential kernels: channels per program and warps (measured on H100, docs/kernels.md). The forward
# takes wider programs once it is chunked. The backward: 1 warp of 32 channels (its reduce-scatter of dB, dC over the
# lanes is written for that); unchunked from 4 programs per SM, else chunked for 32 per SM (it fits ~8 warps an SM at
# ~255 registers; H100 fwd+bwd for targets 8/12/16/24/32: b8 d1536 l2048 2.77/2.12/2.32/2.07/2.04 ms, b1 l65536
# 8.67/9.36/8.05/8.08/7.91 ms); no register cap (168: 5.6-6.3 ms at b8, spills); B and C prefetched into L1.
# "chunking_few": the chunked target where batch x channel blocks are fewer than the SMs (batch 1 at d 1536: 48
# blocks): with the 4-lane local adjoint (fourteenth session), 48 programs per SM gave b1 l65536 fwd+bwd 5.73 ms
# against 5.82 at 32 and 5.74 at 40; at b8 (384 blocks) 32 stays best (1.358 ms; 40: 1.39, 48: 1.37).
# The forward: 1 warp of 32 channels a program; at most 128 registers a thread (ptxas wants ~168 for the main pass,
# which then fits 12 warps an SM instead of 16); B_t and C_t prefetched into L1 16 steps ahead ("prefetch"; 0: off).
# H100, b8 d1536 l2048 bf16, 48 programs per SM: with B also loaded into registers a step ahead (dropped since),
# 0.522 ms with neither, 0.449 with the L1 prefetch, 0.439 with both; the code as it is: 0.474 with the prefetch and
# no register cap, 0.422 with both.
# "quad" (d_state 16: _fwd_quad_kernel, 8 channels a warp): (warps a program, unchunked from programs per SM, chunked
# to programs per SM); None: the lane-a-channel forward for every d_state. H100, bf16, d 1536, same-run A/B against
# the lane-a-channel forward (0.401 ms at b8 l2048, 1.544 at b1 l65536; CUDA-graph replay): 0.270 ms (b8, unchunked,
# 1 warp a program; 2 or 4 warps: 0.42 in an earlier version of the kernel) and 1.45 ms (b1, chunked to 64 programs
# an SM; 32: 1.487, 48: 1.464, 96: 1.452); with "quad_far_in" 0.251 and 1.42. No L1 prefetch of B, C (16 steps
# ahead: 0.307 ms at b8, 32: 0.275): B and C are loaded a group ahead (two groups ahead: 0.279). "quad_far_in": the
# main pass loads u, Δ and z 3 groups ahead instead of 2 (torch profiler, per kernel: b8 0.260 -> 0.242 ms, saving the
# tile states 0.280 -> 0.266; b1 l65536 saving 0.930 -> 0.889, but not saving 0.869 -> 0.993, and the local pass
# 0.563 -> 0.562: so only where the main pass saves states or runs unchunked). "quad_l2_ahead": steps of u, Δ, z the
# main pass prefetches into L2 ahead (0: off); with y stored a group late (always), same-run CUDA-graph A/B, H100,
# b8 l2048 / b1 l65536 forward: 0.2520 -> 0.2316 / 1.4300 -> 1.3888 ms (24 steps: 0.2318, 64: 0.2317; the
# prefetch without the late y 0.2453, the late y alone 0.2491), forward + backward 1.2587 -> 1.2415 / 5.2805 -> 5.2728.
# "quad_bc_evict_last": the main pass loads B and C with the evict_last hint; same-run A/B (twentieth session, H100):
# b8 forward 0.2306 / 0.2310 -> 0.2219 / 0.2218 ms, forward + backward 1.2385 -> 1.1668; b1 l65536 unchanged (forward
# 1.411 -> 1.414, forward + backward 5.280 -> 5.286).
_FWD = {"block_d": 32, "chunked_block_d": 32, "warps": 1, "maxnreg": 128, "prefetch": 16, "quad": (1, 8, 64),
        "quad_far_in": True, "quad_l2_ahead": 32, "quad_bc_evict_last": True}
# "quad" (d_state 16: _bwd_quad_kernel, 8 channels a warp, 254 registers: 8 warps an SM): (unchunked from, else
# chunked to) programs per SM; "quad_few": (below programs per SM, chunked to): H100 fwd+bwd (CUDA graph) for targets
# 16/24/32/48/64/96: b8 d1536 l2048 1.260/1.320/1.320/1.307/1.302/1.284 ms (2 chunks at 16; unchunked 1.315), b1
# l65536 5.464/6.015/5.487/5.316/5.335/5.313 ms; "quad_maxnreg" 168: 1.64 ms at b8 (spills). None: _bwd_seq_kernel.
# Unchunked from 15 programs an SM (1.94 waves of 8 at the kjv-byte training shape b32 d512 l256, 2048 programs):
# the graphed kjv-byte training step 5.03-5.13 -> 4.81-4.82 ms against 2 chunks (16; 12 gave 4.84), H100; b8 d1536
# (1536 programs, 1.45 waves) stays chunked.
_BWD = {"block_d": 32, "warps": 1, "chunking": (4, 32), "chunking_few": 48, "maxnreg": 0, "prefetch": 16,
        "quad_local": True, "quad": (15, 16), "quad_few": (4, 48), "quad_maxnreg": 0}
_C_PAD = 8  # zero rows after l in the backward's fp32 C (the 4-lane local adjoint loads whole groups of 4 steps)
# Chunking costs a second pass over the sequence, so it is used only where batch x channel blocks give fewer than
# _UNCHUNKED_PROGRAMS_PER_SM programs per SM, and then cuts enough chunks for _CHUNKED_PROGRAMS_PER_SM. Forward on an
# H100 (bf16, d 1536, d_state 16) for targets 24/32/48/64 per SM: b8 l2048 0.474/0.432/0.422/0.448 ms, b1 l65536
# 1.793/1.634/1.619/1.692 ms (the backward has its own policy, _BWD["chunking"]).
_UNCHUNKED_PROGRAMS_PER_SM = 4
_CHUNKED_PROGRAMS_PER_SM = 48


# ----------------------------------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def _state_ptrs(pid_b, offs_d, idx, offs_n, DIM, NIDX, N):
    """Pointer offsets of a (BLOCK_D, BLOCK_N) slice [b, idx]^T of a contiguous (b, NIDX, n, d) state tensor."""
    return ((pid_b * NIDX + idx) * N + offs_n[None, :]) * DIM + offs_d[:, None]


@fast_launch
@triton.jit
def _carry_kernel(
    A_ptr, init_ptr, local_ptr, dsum_ptr, out_ptr, DIM, N, NCHUNK,
    REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """Carry a state across chunks: out[c] = s, then s = exp(A dsum[c]) s + local[c], from s = init.

    Forward (REVERSE False): out[c] is the state at the start of chunk c. init: zeros without HAS_INIT. Reverse: the
    chunks run last to first and out[c] is the adjoint flowing into chunk c from its right. init: contiguous (b, n, d);
    local, out: (b, c, n, d).
    """
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_dn = (offs_d < DIM)[:, None] & (offs_n < N)[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_INIT:
        s = tl.load(init_ptr + _state_ptrs(pid_b, offs_d, 0, offs_n, DIM, 1, N), mask=mask_dn, other=0.0)
    else:
        s = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    # 4 chunks an iteration, their loads first: the chain waits on s, not on a round trip to memory per chunk
    for i0 in range(0, NCHUNK, 4):
        d0, l0 = _carry_in(dsum_ptr, local_ptr, pid_b, offs_d, offs_n, mask_dn, i0, DIM, N, NCHUNK, REVERSE)
        d1, l1 = _carry_in(dsum_ptr, local_ptr, pid_b, offs_d, offs_n, mask_dn, i0 + 1, DIM, N, NCHUNK, REVERSE)
        d2, l2 = _carry_in(dsum_ptr, local_ptr, pid_b, offs_d, offs_n, mask_dn, i0 + 2, DIM, N, NCHUNK, REVERSE)
        d3, l3 = _carry_in(dsum_ptr, local_ptr, pid_b, offs_d, offs_n, mask_dn, i0 + 3, DIM, N, NCHUNK, REVERSE)
        s = _carry_out(out_ptr, s, A, d0, l0, pid_b, offs_d, offs_n, mask_dn, i0, DIM, N, NCHUNK, REVERSE)
        s = _carry_out(out_ptr, s, A, d1, l1, pid_b, offs_d, offs_n, mask_dn, i0 + 1, DIM, N, NCHUNK, REVERSE)
        s = _carry_out(out_ptr, s, A, d2, l2, pid_b, offs_d, offs_n, mask_dn, i0 + 2, DIM, N, NCHUNK, REVERSE)
        s = _carry_out(out_ptr, s, A, d3, l3, pid_b, offs_d, offs_n, mask_dn, i0 + 3, DIM, N, NCHUNK, REVERSE)


@triton.jit
def _carry_in(dsum_ptr, local_ptr, pid_b, offs_d, offs_n, mask_dn, i, DIM, N, NCHUNK, REVERSE: tl.constexpr):
    """Σ Δ and the local state of the i-th chunk the carry visits (zeros for the last and past the end: the last
    chunk's local state is never needed, nor computed in the forward)."""
    c = NCHUNK - 1 - i if REVERSE else i
    m = (offs_d * 0 + i + 1) < NCHUNK
    dsum = tl.load(dsum_ptr + (pid_b * DIM + offs_d) * NCHUNK + c, mask=(offs_d < DIM) & m, other=0.0)
    loc = tl.load(local_ptr + _state_ptrs(pid_b, offs_d, c, offs_n, DIM, NCHUNK, N), mask=mask_dn & m[:, None],
                  other=0.0)
    return dsum, loc


@triton.jit
def _carry_out(out_ptr, s, A, dsum, loc, pid_b, offs_d, offs_n, mask_dn, i, DIM, N, NCHUNK, REVERSE: tl.constexpr):
    """Store the state s entering the i-th chunk the carry visits (if any), return the state leaving it."""
    c = NCHUNK - 1 - i if REVERSE else i
    m = (offs_d * 0 + i) < NCHUNK
    tl.store(out_ptr + _state_ptrs(pid_b, offs_d, c, offs_n, DIM, NCHUNK, N), s, mask=mask_dn & m[:, None])
    return tl.exp(A * dsum[:, None]) * s + loc


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
def _prefetch(ptrs, LEVEL: tl.constexpr):
    """prefetch.global.L1 or .L2 (LEVEL "L1", "L2") of each lane's address (GPU only: inline PTX)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0; prefetch.global." + LEVEL + " [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _quad_prefetch_l2(j, r0, L, pid_d, pid_b, chs, lane, DIM, s_one, u_ptr, su_b, su_d, su_l, dt_ptr, sdt_b, sdt_d,
                      sdt_l, z_ptr, sz_b, sz_d, sz_l, HAS_Z: tl.constexpr):
    """L2 prefetch, in tile j, of steps r0 .. r0 + 15 of u, Δ and z, for the model's layout (u channel-major, as the
    conv hands it over; Δ and z time-major, from the projections; other layouts get less of it). u: every 4th tile,
    each lane the line of its channel at step r0 (128 bytes: 64 bf16 steps; every lane's channel must exist). Δ and z:
    a step's row is read by every warp of the batch row, so in each tile every 8th warp in turn prefetches row
    (pid_d / 8) % 16 of the window, its lanes 128 bytes each (the row's first 2048 bf16 channels)."""
    if (j % 4) == 0:
        _prefetch(u_ptr + pid_b * su_b + chs * su_d + tl.minimum(r0, L - 1) * su_l, "L2")
    if ((pid_d + j) & 7) == 0:
        rr = tl.minimum(r0 + ((pid_d >> 3) & 15), L - 1)
        cl = tl.minimum(lane * 64, DIM - 1) * s_one
        _prefetch(dt_ptr + pid_b * sdt_b + rr * sdt_l + cl * sdt_d, "L2")
        if HAS_Z:
            _prefetch(z_ptr + pid_b * sz_b + rr * sz_l + cl * sz_d, "L2")


@triton.jit
def _load_or_zero(ptrs, mask):
    """tl.load, with zeros where ``mask`` is off; no mask at all when ``mask`` is None."""
    if mask is None:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _lane_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, N: tl.constexpr,
                BLOCK_N: tl.constexpr, G: tl.constexpr, PERM: tl.constexpr, A_DN: tl.constexpr):
    """What the sequential kernels share: a lane per channel, its BLOCK_N states a (BLOCK_D, BLOCK_N // G, G) tile.
    Returns the channels offs_d and their mask, n3 (1, groups, G) the states, d3 (BLOCK_D, 1, 1) the channels times the
    stride s_one the JIT may not specialise (1 at run time: see _fwd_seq_kernel), mask3, A log2 e as a tile (for exp2;
    A_ptr: A as (d, n) where A_DN, else its (n, d) transpose), and the Δ bias. PERM (32 lanes x 4 groups of 4 states): a
    lane's group slot j holds the states of group j ^ _group_perm(lane) (n3 then (BLOCK_D, groups, G)), for _lane_sums;
    every state-indexed load and store goes through n3, and the sums over states do not care about the order."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    grp = tl.arange(0, BLOCK_N // G)[None, :, None]
    if PERM:
        grp = grp ^ _group_perm(tl.arange(0, BLOCK_D))[:, None, None]
    n3 = grp * G + tl.arange(0, G)[None, None, :]
    d3 = offs_d[:, None, None] * s_one
    mask3 = mask_d[:, None, None] & (n3 < N)
    if A_DN:
        A2 = tl.load(A_ptr + d3 * N + n3, mask=mask3, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        A2 = tl.load(A_ptr + n3 * DIM + d3, mask=mask3, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = load_channel_vector(bias_ptr, offs_d * s_one, mask_d, HAS_BIAS)
    return offs_d, mask_d, n3, d3, mask3, A2, bias


@fast_launch
@triton.jit(do_not_specialize=["su_d", "sdt_d", "sz_d", "sy_d", "s_one"])
def _fwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, start_ptr, y_ptr, final_ptr, sub_ptr,
    L, DIM, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_l, sC_b, sC_l, sz_b, sz_d, sz_l, sy_d, s_one,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
    HAS_START: tl.constexpr,
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

    States in memory are (b, index, n, d), channels contiguous. LOCAL: from a zero state, write the chunk's end state to
    final_ptr as (b, chunks, n, d) and its sum of Δ to sub_ptr as (b, d, chunks). Otherwise: from the chunk's start
    state (start: (b, chunks, n, d); zeros without HAS_START) write y (time-major, (b, l, d) memory), the final state
    (last chunk, (b, n, d)) and, when SAVE, the state at each tile start -> sub (b, NSUB, d, n): a lane's states are
    contiguous, 4 vector stores a tile (in (n, d) order, with the channels contiguous, it was 16 stores and their
    16 addresses).
    """
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d, mask_d, n3, d3, mask3, A, bias = _lane_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, BLOCK_D, N,
                                                         BLOCK_N, G, False, True)
    Dv = load_channel_vector(D_ptr, offs_d * s_one, mask_d, HAS_D)
    if LOCAL or not HAS_START:
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
            tl.store(sub_ptr + ((pid_b * NSUB + j) * DIM + d3) * N + n3, h, mask=mask3)
        for t0 in range(j * BLOCK_T, tl.minimum(j * BLOCK_T + BLOCK_T, l_groups), U):
            ug, dg, zg = grp
            grp = _fwd_group(tl.multiple_of(tl.minimum(t0 + U, tl.maximum(l_groups - U, 0)), U), L, u_g, dt_g, z_g,
                             mask_g, offs_k, su_l, sdt_l, sz_l, HAS_Z and not LOCAL, U)
            for k in tl.static_range(U):
                if PF > 0:  # B_t and C_t rows PF steps ahead into L1 (their loads below then hit it)
                    tp = tl.minimum(t0 + k + PF, L - 1)
                    _prefetch(B_row + tp * sB_l, "L1")
                    if not LOCAL:
                        _prefetch(C_row + tp * sC_l, "L1")
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


@triton.jit
def _shfl_quad(x, k: tl.constexpr, SHFL: tl.constexpr):
    """x of lane k of this lane's aligned group of 4 lanes (axis 0): shfl.sync.idx over segments of 4 lanes (SHFL 1;
    c = 0x1c03: segment mask 28, clamp 3; GPU only: inline PTX) or a gather along axis 0 (SHFL 2, for the
    interpreter)."""
    if SHFL == 1:
        y = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 7171, -1;", "=r,r,r",
                                      [x, tl.full(x.shape, k, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.gather(x, (tl.arange(0, x.shape[0]) // 4) * 4 + k, 0)
    return y


@triton.jit
def _quad_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS: tl.constexpr, LANES: tl.constexpr):
    """What the 4-lane kernels share (d_state 16; _fwd_quad_kernel): lane i is place q = i % 4 of channel ch; returns
    q, ch, its mask m_c, ch and q times the stride the JIT may not specialise (s_one = 1 at run time: see
    _fwd_seq_kernel), n2 (LANES, 4) the lane's states and their mask m2, A log2 e at them (A: (d, 16) contiguous), and
    the Δ bias."""
    lane = tl.arange(0, LANES)
    q = lane % 4
    ch = pid_d * (LANES // 4) + lane // 4
    m_c = ch < DIM
    chs = ch * s_one
    n2 = q[:, None] * 4 + tl.arange(0, 4)[None, :]
    m2 = m_c[:, None] & (n2 < 16)
    A2 = tl.load(A_ptr + chs[:, None] * 16 + n2, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
    return q, ch, m_c, chs, q * s_one, n2, m2, A2, load_channel_vector(bias_ptr, chs, m_c, HAS_BIAS)


@triton.jit
def _quad_inputs(t, L, u_p, dt_p, z_p, m_c, q, HAS_Z: tl.constexpr):
    """u, raw Δ and z at u_p, dt_p, z_p (step t + q of the lane's channel: q is the lane's place in its channel's 4
    lanes), zeros past L, in their dtype."""
    m = m_c & (t + q < L)
    u = tl.load(u_p, mask=m, other=0.0)
    raw = tl.load(dt_p, mask=m, other=0.0)
    z = tl.load(z_p, mask=m, other=0.0) if HAS_Z else raw
    return u, raw, z


@triton.jit
def _quad_prep(ug, rg, zg, t, L, m_c, q, bias, Dv, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
               FAST: tl.constexpr):
    """The per-channel work of step t + q (this lane's step of the group at t): Δ after bias and softplus (0 past
    L), Δ u, D u, the gate silu(z) (1 without z) and whether the step is live."""
    live = m_c & (t + q < L)
    u = ug.to(tl.float32)
    dtq = tl.where(live, softplus(rg.to(tl.float32) + bias, SOFTPLUS, FAST), 0.0)
    gate = silu(zg.to(tl.float32), FAST) if HAS_Z else tl.full(u.shape, 1.0, tl.float32)
    return dtq, dtq * u, Dv * u, gate, live


@triton.jit
def _quad_step(h, A2, dtq, dtuq, k: tl.constexpr, Bt, Ct, SHFL: tl.constexpr):
    """Step k of a group of 4 in the 4-lane layout: Δ and Δu of the step come from lane k of the channel's 4; Bt, Ct:
    the lane's 4 states of B_t, C_t. Returns h and this lane's part of C_t . h (its 4 of the 16 states; a caller that
    does not use it passes any Ct, and the compiler drops the sum)."""
    dt = _shfl_quad(dtq, k, SHFL)
    dtu = _shfl_quad(dtuq, k, SHFL)
    h = tl.exp2(dt[:, None] * A2) * h + Bt * dtu[:, None]
    return h, tl.sum(h * Ct, axis=1)


@triton.jit
def _quad_row(p, EVICT_LAST: tl.constexpr):
    """One row of _quad_rows, in fp32."""
    if EVICT_LAST:
        v = tl.load(p, eviction_policy="evict_last")
    else:
        v = tl.load(p)
    return v.to(tl.float32)


@triton.jit
def _quad_rows(p, EVICT_LAST: tl.constexpr = False):
    """The 4 rows of a group at p (of B or C), each lane its 4 states of a row, in fp32. EVICT_LAST: load them with
    the evict_last hint, L1 and L2 (see _fwd_quad_kernel)."""
    return (_quad_row(p, EVICT_LAST), _quad_row(p + 16, EVICT_LAST), _quad_row(p + 32, EVICT_LAST),
            _quad_row(p + 48, EVICT_LAST))


@fast_launch
@triton.jit(do_not_specialize=["su_d", "sdt_d", "sz_d", "s_one"])
def _fwd_quad_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, start_ptr, y_ptr, final_ptr, sub_ptr,
    L, DIM, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sBC_b, sz_b, sz_d, sz_l, s_one,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
    HAS_START: tl.constexpr, LOCAL: tl.constexpr, FAST: tl.constexpr, LANES: tl.constexpr, BLOCK_T: tl.constexpr,
    SHFL: tl.constexpr, FAR_IN: tl.constexpr, L2_AHEAD: tl.constexpr, BC_LAST: tl.constexpr,
):
    """The forward of _fwd_seq_kernel (same arguments and outputs; d_state 16) with 4 lanes a channel: each lane holds
    4 of its channel's 16 states, so a warp is 8 channels and batch 8 x 1536 channels is 1536 warps, enough to fill
    an H100 without chunking the sequence (and its second pass: one exp per state and step in all).

    Per group of 4 steps, lane q of a channel loads u, Δ, z of step t0 + q and computes that step's softplus (and the
    gate): no per-channel work is repeated over the 4 lanes. Each step takes its Δ and Δu from its lane (shfl.idx),
    and each lane sums C_t . h over its 4 states; the 4 steps' partial sums are then reduce-scattered over the 4 lanes
    (3 shuffles), leaving lane q the whole C_t . h of step t0 + q, which it gates and stores.
    B and C: fp32 (b, l + 8, 16) with zero rows past l (a group's loads, and the next group's, need no mask), each
    lane reading its 4 states as one 16-byte vector, an iteration ahead.

    The main pass gates and stores a group's y in the next group's iteration (its 4 partial sums carried), so that the
    reduce-scatter's shuffles overlap the next group's steps; and with L2_AHEAD (GPU only) it prefetches u, Δ and z
    into L2 that many steps ahead, a tile (16 steps) at a time (_quad_prefetch_l2): ptxas puts the loads of u, Δ, z
    three groups ahead and those of B, C one group ahead on one scoreboard, so each group's first use of B waited for
    u, Δ, z from HBM. BC_LAST: the main pass loads B and C with the evict_last hint (L1 and L2). Measured, not
    derived: the b8 forward 0.2310 -> 0.2218 ms (H100) with the same L1 hit rate under ncu; the hint on B alone, on C
    alone, or with hints on u, Δ, z as well was slower (BENCHMARKS.md section 5)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q, ch, m_c, chs, qs, n2, m2, A2, bias = _quad_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, LANES)
    Dv = load_channel_vector(D_ptr, chs, m_c, HAS_D)
    if LOCAL or not HAS_START:
        h = tl.zeros((LANES, 4), tl.float32)
    else:
        h = tl.load(start_ptr + ((pid_b * NCHUNK + pid_c) * 16 + n2) * DIM + chs[:, None], mask=m2, other=0.0)
    dsum = tl.zeros((LANES,), tl.float32)
    b1 = (q & 2) != 0
    b0 = (q & 1) != 0
    GT: tl.constexpr = BLOCK_T // 4  # groups a tile
    g0 = pid_c * SUBS * GT
    g1 = tl.minimum(g0 + SUBS * GT, tl.cdiv(L, 4))
    u_q = u_ptr + pid_b * su_b + chs * su_d + qs * su_l
    dt_q = dt_ptr + pid_b * sdt_b + chs * sdt_d + qs * sdt_l
    z_q = z_ptr + pid_b * sz_b + chs * sz_d + qs * sz_l if HAS_Z else u_q
    y_q = y_ptr + pid_b * L * DIM + qs * DIM + chs
    B_q = B_ptr + pid_b * sBC_b + n2
    C_q = C_ptr + pid_b * sBC_b + n2
    # Software-pipelined over groups: an iteration runs the 4 steps of group g, the per-channel work of group g + 1
    # (softplus, the gate: independent of the steps, so the two overlap) and loads B, C of group g + 1 and u, Δ, z of
    # group g + 2 (B, C: the padding rows keep them within the buffer; u, Δ, z: masked past L).
    t = g0 * 4
    ug, rg, zg = _quad_inputs(t, L, u_q + t * su_l, dt_q + t * sdt_l, z_q + t * sz_l, m_c, q, HAS_Z and not LOCAL)
    cur = _quad_prep(ug, rg, zg, t, L, m_c, q, bias, Dv, HAS_Z and not LOCAL, SOFTPLUS, FAST)
    t += 4
    nxt = _quad_inputs(t, L, u_q + t * su_l, dt_q + t * sdt_l, z_q + t * sz_l, m_c, q, HAS_Z and not LOCAL)
    if FAR_IN and not LOCAL:
        t += 4
        nxt2 = _quad_inputs(t, L, u_q + t * su_l, dt_q + t * sdt_l, z_q + t * sz_l, m_c, q, HAS_Z)
    nB = _quad_rows(B_q + g0 * 64, BC_LAST)
    nC = nB if LOCAL else _quad_rows(C_q + g0 * 64, BC_LAST)
    if LOCAL:  # one loop over the chunk's groups (0.561 -> 0.540 ms at b1 l65536 against the main pass's tile loops)
        for g in tl.range(g0, g1, loop_unroll_factor=2):
            t = g * 4
            dtq, dtuq, _, _, _ = cur
            Bg = nB
            ug, rg, zg = nxt
            cur = _quad_prep(ug, rg, zg, t + 4, L, m_c, q, bias, Dv, False, SOFTPLUS, FAST)
            tn = t + 8
            nxt = _quad_inputs(tn, L, u_q + tn * su_l, dt_q + tn * sdt_l, z_q + tn * sz_l, m_c, q, False)
            nB = _quad_rows(B_q + (t + 4) * 16)
            h, _ = _quad_step(h, A2, dtq, dtuq, 0, Bg[0], Bg[0], SHFL)
            h, _ = _quad_step(h, A2, dtq, dtuq, 1, Bg[1], Bg[1], SHFL)
            h, _ = _quad_step(h, A2, dtq, dtuq, 2, Bg[2], Bg[2], SHFL)
            h, _ = _quad_step(h, A2, dtq, dtuq, 3, Bg[3], Bg[3], SHFL)
            dsum += dtq
    else:
        lane = tl.arange(0, LANES)
        zf = tl.zeros((LANES,), tl.float32)
        # the previous group's partial sums of C_t . h, D u, gate, live steps and start (none before the first)
        p0, p1, p2, p3, pyD, pgate, plive, pt = zf, zf, zf, zf, zf, zf, m_c & (q < 0), t
        for j in range(pid_c * SUBS, tl.minimum(pid_c * SUBS + SUBS, NSUB)):
            if SAVE:
                tl.store(sub_ptr + ((pid_b * NSUB + j) * DIM + chs[:, None]) * 16 + n2, h, mask=m2)
            if L2_AHEAD:
                _quad_prefetch_l2(j, j * BLOCK_T + L2_AHEAD, L, pid_d, pid_b, chs, lane, DIM, s_one, u_ptr, su_b, su_d,
                                  su_l, dt_ptr, sdt_b, sdt_d, sdt_l, z_ptr, sz_b, sz_d, sz_l, HAS_Z)
            # unrolled twice: the loop-carried loads then need 9 register copies a group instead of 49
            for g in tl.range(j * GT, tl.minimum(j * GT + GT, g1), loop_unroll_factor=2):
                t = g * 4
                dtq, dtuq, yD, gate, live = cur
                Bg, Cg = nB, nC
                ug, rg, zg = nxt
                cur = _quad_prep(ug, rg, zg, t + 4, L, m_c, q, bias, Dv, HAS_Z, SOFTPLUS, FAST)
                if FAR_IN:
                    nxt = nxt2
                    tn = t + 12
                    nxt2 = _quad_inputs(tn, L, u_q + tn * su_l, dt_q + tn * sdt_l, z_q + tn * sz_l, m_c, q, HAS_Z)
                else:
                    tn = t + 8
                    nxt = _quad_inputs(tn, L, u_q + tn * su_l, dt_q + tn * sdt_l, z_q + tn * sz_l, m_c, q, HAS_Z)
                nB = _quad_rows(B_q + (t + 4) * 16, BC_LAST)
                nC = _quad_rows(C_q + (t + 4) * 16, BC_LAST)
                # the previous group's y: lane q, the whole C_t . h of step pt + q
                y = (_quad_rs(p0, p1, p2, p3, b1, b0, SHFL) + pyD) * pgate
                tl.store(y_q + pt * DIM, y.to(y_ptr.dtype.element_ty), mask=plive)
                h, p0 = _quad_step(h, A2, dtq, dtuq, 0, Bg[0], Cg[0], SHFL)
                h, p1 = _quad_step(h, A2, dtq, dtuq, 1, Bg[1], Cg[1], SHFL)
                h, p2 = _quad_step(h, A2, dtq, dtuq, 2, Bg[2], Cg[2], SHFL)
                h, p3 = _quad_step(h, A2, dtq, dtuq, 3, Bg[3], Cg[3], SHFL)
                pyD, pgate, plive, pt = yD, gate, live, t
        y = (_quad_rs(p0, p1, p2, p3, b1, b0, SHFL) + pyD) * pgate
        tl.store(y_q + pt * DIM, y.to(y_ptr.dtype.element_ty), mask=plive)
    if LOCAL:
        dsum = _quad_sum(dsum, SHFL)
        tl.store(final_ptr + ((pid_b * NCHUNK + pid_c) * 16 + n2) * DIM + chs[:, None], h, mask=m2)
        tl.store(sub_ptr + (pid_b * DIM + chs) * NCHUNK + pid_c, dsum, mask=m_c & (q == 0))
    elif pid_c == NCHUNK - 1:
        tl.store(final_ptr + (pid_b * 16 + n2) * DIM + chs[:, None], h, mask=m2)


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernels


@fast_launch
@triton.jit(do_not_specialize=["sdt_d", "sz_d", "sdy_d", "s_one"])
def _bwd_local_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, local_ptr, dsum_ptr,
    L, DIM, SUBS, NCHUNK,
    sdt_b, sdt_d, sdt_l, sC_b, sC_l, sz_b, sz_d, sz_l, sdy_b, sdy_d, sdy_l, s_one,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, EVEN_D: tl.constexpr,
    DTVEC: tl.constexpr, ZVEC: tl.constexpr, DYVEC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    N: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, PF: tl.constexpr,
):
    """Per chunk but the first (program axis 1 + 1), with nothing flowing in from its right: the adjoint at the
    chunk's first step -> local (b, chunks, n, d), and the sum of Δ_{t+1} over the chunk's steps t -> dsum
    (b, d, chunks). The reverse recurrence g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}, one step after the other, in the
    layout of _bwd_seq_kernel (a lane per channel, its states in registers); dy, z and Δ are read 4 steps at a
    time, C_t from L1 (prefetched PF steps ahead)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1) + 1, tl.program_id(2).to(tl.int64)
    offs_d, mask_d, n3, d3, mask3, A2, bias = _lane_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, BLOCK_D, N,
                                                          BLOCK_N, G, False, True)
    bn = n3 + d3 * 0
    mask_bn = (bn < N) if N != BLOCK_N else None
    C_ptrs = C_ptr + pid_b * sC_b + bn
    C_row = C_ptr + pid_b * sC_b + offs_d * 0
    offs_k = tl.arange(0, 4)
    dt_g = _group_ptrs(dt_ptr, pid_b, offs_d, offs_k, sdt_b, sdt_d, sdt_l, DTVEC)
    dy_g = _group_ptrs(dy_ptr, pid_b, offs_d, offs_k, sdy_b, sdy_d, sdy_l, DYVEC)
    z_g = _group_ptrs(z_ptr, pid_b, offs_d, offs_k, sz_b, sz_d, sz_l, ZVEC) if HAS_Z else dy_g
    mask_g = None if EVEN_D else mask_d[:, None] & (offs_k[None, :] >= 0)
    t_start = pid_c * SUBS * BLOCK_T
    t_end = tl.minimum(t_start + SUBS * BLOCK_T, L)
    live_e = mask_d & (offs_d * 0 + t_end < L)
    raw_e = tl.load(dt_ptr + pid_b * sdt_b + offs_d * sdt_d + t_end * sdt_l, mask=live_e, other=0.0).to(tl.float32)
    dt_next = tl.where(live_e, softplus(raw_e + bias, SOFTPLUS, FAST), 0.0)
    g = tl.zeros((BLOCK_D, BLOCK_N // G, G), tl.float32)
    dsum = tl.zeros((BLOCK_D,), tl.float32)
    ngroups = tl.cdiv(t_end - t_start, 4)
    # Groups of 4 steps, last to first, each loaded one iteration ahead (carried unconverted); only the first (the
    # chunk's last group) may run past L.
    ts = t_start + 4 * (ngroups - 1)
    mask_t = (offs_k[None, :] + ts < L) & mask_d[:, None]
    rgn = _load4(dt_g, ts, sdt_l, L, mask_g, mask_t)
    dygn = _load4(dy_g, ts, sdy_l, L, mask_g, mask_t)
    zgn = _load4(z_g, ts, sz_l, L, mask_g, mask_t) if HAS_Z else dygn
    for i in range(ngroups):
        ts = t_start + 4 * (ngroups - 1 - i)
        rg, dyg, zg = rgn.to(tl.float32), dygn.to(tl.float32), zgn.to(tl.float32)
        tn = tl.maximum(ts - 4, t_start)  # the next group: whole (its end is this group's start)
        rgn = _load_or_zero(dt_g + tn * sdt_l, mask_g)
        dygn = _load_or_zero(dy_g + tn * sdy_l, mask_g)
        if HAS_Z:
            zgn = _load_or_zero(z_g + tn * sz_l, mask_g)
            dyg = dyg * zg * tl.sigmoid(zg)
        for k in tl.static_range(3, -1, -1):
            t = ts + k
            if PF > 0:
                _prefetch(C_row + tl.maximum(t - PF, 0) * sC_l, "L1")
            Ct = _load_or_zero(C_ptrs + tl.minimum(t, L - 1) * sC_l, mask_bn)
            g = tl.exp2(dt_next[:, None, None] * A2) * g + Ct * _col(dyg, offs_k, k)[:, None, None]
            dsum += dt_next
            dt_next = tl.where(mask_d & (t < L), softplus(_col(rg, offs_k, k) + bias, SOFTPLUS, FAST), 0.0)
    tl.store(local_ptr + ((pid_b * NCHUNK + pid_c) * N + n3) * DIM + d3, g, mask=mask3)
    tl.store(dsum_ptr + (pid_b * DIM + offs_d * s_one) * NCHUNK + pid_c, dsum, mask=mask_d)


@fast_launch
@triton.jit(do_not_specialize=["sdt_d", "sz_d", "sdy_d", "s_one"])
def _bwd_local_quad_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, local_ptr, dsum_ptr,
    L, DIM, SUBS, NCHUNK,
    sdt_b, sdt_d, sdt_l, sC_b, sz_b, sz_d, sz_l, sdy_b, sdy_d, sdy_l, s_one,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, LANES: tl.constexpr,
    BLOCK_T: tl.constexpr, SHFL: tl.constexpr,
):
    """_bwd_local_kernel (the local adjoint of each chunk but the first, and its sum of Δ_{t+1}) in the layout of
    _fwd_quad_kernel (d_state 16, 4 lanes a channel, 4 states a lane). Groups of 4 steps, last to first: lane q
    computes Δ and the gated dy of step t0 + q (softplus, silu: once per channel and step), each step takes Δ_{t+1} and
    dy'_t from their lanes (shfl.idx; Δ_{t0+4} from the group after, carried). A (d, 16) contiguous; C fp32
    (b, rows, 16) with zero rows past l (at least 3)."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1) + 1, tl.program_id(2).to(tl.int64)
    q, ch, m_c, chs, qs, n2, m2, A2, bias = _quad_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, LANES)
    t_start = pid_c * SUBS * BLOCK_T
    t_end = tl.minimum(t_start + SUBS * BLOCK_T, L)
    live_e = m_c & (ch * 0 + t_end < L)
    raw_e = tl.load(dt_ptr + pid_b * sdt_b + chs * sdt_d + t_end * sdt_l, mask=live_e, other=0.0).to(tl.float32)
    dt_hi = tl.where(live_e, softplus(raw_e + bias, SOFTPLUS, FAST), 0.0)  # Δ of the step after the chunk
    dt_q = dt_ptr + pid_b * sdt_b + chs * sdt_d + qs * sdt_l
    dy_q = dy_ptr + pid_b * sdy_b + chs * sdy_d + qs * sdy_l
    z_q = z_ptr + pid_b * sz_b + chs * sz_d + qs * sz_l if HAS_Z else dy_q
    C_q = C_ptr + pid_b * sC_b + n2
    g = tl.zeros((LANES, 4), tl.float32)
    dsum = tl.zeros((LANES,), tl.float32)
    ngroups = tl.cdiv(t_end - t_start, 4)
    # as in _fwd_quad_kernel, software-pipelined: an iteration steps group i, prepares group i - 1 and loads its C
    # rows, and loads dy, Δ, z of group i - 2 (groups before the chunk's start lie within the sequence: chunk >= 1)
    t = t_start + 4 * (ngroups - 1)
    dyg, rg, zg = _quad_inputs(t, L, dy_q + t * sdy_l, dt_q + t * sdt_l, z_q + t * sz_l, m_c, q, HAS_Z)
    cur = _quad_adj_prep(dyg, rg, zg, t, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
    t -= 4
    nxt = _quad_inputs(t, L, dy_q + t * sdy_l, dt_q + t * sdt_l, z_q + t * sz_l, m_c, q, HAS_Z)
    nC = _quad_rows(C_q + (t + 4) * 16)
    for i in tl.range(0, ngroups, loop_unroll_factor=2):
        t = t_start + 4 * (ngroups - 1 - i)
        dtq, dyq = cur
        Cg = nC
        dyg, rg, zg = nxt
        cur = _quad_adj_prep(dyg, rg, zg, t - 4, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
        tn = t - 8
        nxt = _quad_inputs(tn, L, dy_q + tn * sdy_l, dt_q + tn * sdt_l, z_q + tn * sz_l, m_c, q, HAS_Z)
        nC = _quad_rows(C_q + (t - 4) * 16)
        d3 = _shfl_quad(dtq, 3, SHFL)
        d2 = _shfl_quad(dtq, 2, SHFL)
        d1 = _shfl_quad(dtq, 1, SHFL)
        g = tl.exp2(dt_hi[:, None] * A2) * g + Cg[3] * _shfl_quad(dyq, 3, SHFL)[:, None]
        g = tl.exp2(d3[:, None] * A2) * g + Cg[2] * _shfl_quad(dyq, 2, SHFL)[:, None]
        g = tl.exp2(d2[:, None] * A2) * g + Cg[1] * _shfl_quad(dyq, 1, SHFL)[:, None]
        g = tl.exp2(d1[:, None] * A2) * g + Cg[0] * _shfl_quad(dyq, 0, SHFL)[:, None]
        dsum += ((dt_hi + d3) + (d2 + d1))
        dt_hi = _shfl_quad(dtq, 0, SHFL)
    tl.store(local_ptr + ((pid_b * NCHUNK + pid_c) * 16 + n2) * DIM + chs[:, None], g, mask=m2)
    tl.store(dsum_ptr + (pid_b * DIM + chs) * NCHUNK + pid_c, dsum, mask=m_c & (q == 0))


@triton.jit
def _quad_adj_prep(dyg, rg, zg, t, L, m_c, q, bias, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """The per-channel work of step t + q in the 4-lane adjoint: Δ (0 past L) and the gated dy (dy silu(z))."""
    live = m_c & (t + q < L)
    dtq = tl.where(live, softplus(rg.to(tl.float32) + bias, SOFTPLUS, FAST), 0.0)
    dyq = dyg.to(tl.float32)
    if HAS_Z:
        dyq *= silu(zg.to(tl.float32), FAST)
    return dtq, dyq


@triton.jit
def _shfl_xor(x, M: tl.constexpr, SHFL: tl.constexpr):
    """x of the lane (axis 0) whose index differs from this lane's in bit M: shfl.sync.bfly (SHFL 1; GPU only: inline
    PTX) or a gather along axis 0 (SHFL 2: the same data movement, which the interpreter runs, for the CPU tests)."""
    if SHFL == 1:
        y = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=r,r,r",
                                      [x, tl.full(x.shape, M, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.gather(x, (tl.zeros(x.shape, tl.int32) + _lane_index(x)) ^ M, 0)
    return y


@triton.jit
def _quad_sum(x, SHFL: tl.constexpr):
    """x summed over the aligned 4 lanes of a channel (lane bits 0 and 1), in each of them."""
    x += _shfl_xor(x, 1, SHFL)
    return x + _shfl_xor(x, 2, SHFL)


@triton.jit
def _lane_index(x):
    """The index along x's axis 0 (the lanes), shaped to broadcast against x (rank 1 to 4)."""
    i = tl.arange(0, x.shape[0])
    if len(x.shape) == 2:
        i = i[:, None]
    elif len(x.shape) == 3:
        i = i[:, None, None]
    elif len(x.shape) == 4:
        i = i[:, None, None, None]
    return i


@triton.jit
def _halve(x, bit, M: tl.constexpr, SHFL: tl.constexpr):
    """One level of a reduce-scatter over the lanes: split x's last axis in two, keep the half this lane's bit picks,
    send the other half to the lane across bit M and add what it sends back."""
    lo, hi = tl.split(x)
    return tl.where(bit, hi, lo) + _shfl_xor(tl.where(bit, lo, hi), M, SHFL)


@triton.jit
def _fold(x, M: tl.constexpr, SHFL: tl.constexpr):
    """A level of the reduce-scatter without selects: x's last axis splits into the half this lane keeps (0) and the
    half it sends to the lane across bit M (1), whose slot 1 holds the states of this lane's slot 0 (_group_perm)."""
    lo, hi = tl.split(x)
    return lo + _shfl_xor(hi, M, SHFL)


@triton.jit
def _group_perm(lane):
    """Which group of 4 states a lane keeps in group slot 0 (slot j: group j ^ this), from lane bits 4 and 3 (the
    lanes _lane_sums pairs first), so that the first two levels of the reduce-scatter need no selects."""
    return ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1)


@triton.jit
def _lane_sums(dB, dC, lane, SHFL: tl.constexpr):
    """Sums over the 32 lanes (channels) of the 32 values (dB, dC: (32, 4, 4) tiles, a lane per channel, group slots
    permuted by _group_perm), a value per lane (which: _lane_sum_index). 31 shuffles and 31 adds, not the 160 of a
    reduction per value; the first two levels (16 + 8 values) swap group slots, which the permutation lines up
    across the lanes, so only the last three (8 + 4 + 2 values) select."""
    v = tl.reshape(tl.join(dB, dC), (32, 2, 2, 4, 2))  # (lane, group bit 1, group bit 0, n % 4, dB|dC)
    v = _fold(tl.permute(v, (0, 2, 3, 4, 1)), 16, SHFL)  # group bit 1 <-> lane bit 4
    v = _fold(tl.permute(v, (0, 2, 3, 1)), 8, SHFL)  # group bit 0 <-> lane bit 3
    v = tl.reshape(v, (32, 2, 2, 2))  # (lane, n bit 1, n bit 0, dB|dC)
    v = _halve(v, ((lane & 4) != 0)[:, None, None], 4, SHFL)  # dB | dC
    v = _halve(v, ((lane & 2) != 0)[:, None], 2, SHFL)  # n bit 0
    return _halve(v, (lane & 1) != 0, 1, SHFL)  # n bit 1


@triton.jit
def _lane_sum_index(lane):
    """Which sum _lane_sums leaves in each lane: (0 for dB or 1 for dC, state)."""
    n = _group_perm(lane) * 4 + (lane & 1) * 2 + ((lane >> 1) & 1)
    return (lane >> 2) & 1, n


@triton.jit
def _load4(ptrs, t, s_l, L, mask_g, mask_t):
    """Steps t .. t + 3 of a (b, d, l) tensor as a (BLOCK_D, 4) tile in its dtype (a lane holds its channel's 4 steps;
    see _col): ``ptrs`` (BLOCK_D, 4) at step 0; mask_g: the channel mask (None for whole blocks) for a whole group,
    mask_t the step-and-channel mask for a group that runs past L (zeros there). Groups are loaded an iteration
    ahead and carried unconverted, so that nothing waits for the load before the iteration that uses it."""
    if t + 4 <= L:
        v = _load_or_zero(ptrs + t * s_l, mask_g)
    else:
        v = tl.load(ptrs + t * s_l, mask=mask_t, other=0.0)
    return v


@triton.jit
def _store4(ptrs, v, t, s_l, L, mask_g, mask_t):
    """Store a (BLOCK_D, 4) tile of steps t .. t + 3 (none past L): the counterpart of _load4."""
    v = v.to(ptrs.dtype.element_ty)
    if t + 4 <= L:
        if mask_g is None:
            tl.store(ptrs + t * s_l, v)
        else:
            tl.store(ptrs + t * s_l, v, mask=mask_g)
    else:
        tl.store(ptrs + t * s_l, v, mask=mask_t)


@triton.jit
def _col(tile, offs_k, k: tl.constexpr):
    """Column k of a (BLOCK_D, 4) tile whose columns a lane holds in registers, in fp32: folds to a register read.
    The backward's tiles of 4 steps are channels first: with no contiguity to go by (channel strides hidden,
    time-major tensors), Triton's coalescing pass puts the lanes along the first axis."""
    return tl.sum(tl.where(offs_k[None, :] == k, tile.to(tl.float32), -0.0), axis=1)


@triton.jit
def _put(tile, offs_k, k: tl.constexpr, col):
    """``tile`` with column k replaced by ``col``: in registers, as _col."""
    return tl.where(offs_k[None, :] == k, col[:, None], tile)


@triton.jit
def _group_ptrs(ptr, pid_b, offs_d, offs_k, s_b, s_d, s_l, VEC: tl.constexpr):
    """(BLOCK_D, 4) addresses of steps 0 .. 3 of a (b, d, l) tensor (see _col). VEC: the launcher checked that each
    channel's 4 steps are contiguous and aligned (time stride 1, 4 dividing the other strides and the address), so
    that a lane reads or writes them as one vector."""
    if VEC:
        p = ptr + tl.multiple_of(pid_b * s_b + offs_d * s_d, 4)[:, None] + offs_k[None, :]
    else:
        p = ptr + (pid_b * s_b + offs_d * s_d)[:, None] + offs_k[None, :] * s_l
    return p


@triton.jit
def _out_step(ptrs, t, s_l, v, live, tile, offs_k, k: tl.constexpr, VEC: tl.constexpr):
    """An output's value at step t (sub-tile column k): collected into ``tile`` (stored by _store4 after the
    sub-tile) where VEC, else stored now (``ptrs``: the channels' addresses at step 0)."""
    if VEC:
        tile = _put(tile, offs_k, k, v)
    else:
        tl.store(ptrs + t * s_l, v.to(ptrs.dtype.element_ty), mask=live)
    return tile


@triton.jit
def _stage(scv, ug, rg, dyg, zg, live, bias, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, HAS_Z: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """Pass A's per-step inputs of a sub-tile for passes B, C, from its u, raw Δ, dy and z as loaded ((BLOCK_D, 4),
    zeros past L; live: the steps before L of the block's channels): Δ after softplus (0 elsewhere), softplus' (the
    sigmoid; 1 without softplus), u, dy silu(z) and dy silu'(z) (dz over the ungated output), fp32, stored to this
    sub-tile's scratch rows ``scv`` (5 x 16 bytes a lane). Returns Δ and u."""
    ug = ug.to(tl.float32)
    rg = rg.to(tl.float32) + bias[:, None]
    dtg = tl.where(live, softplus(rg, SOFTPLUS, FAST), 0.0)
    if SOFTPLUS:
        spg = tl.where(rg > 20.0, 1.0, tl.sigmoid(rg))
    else:
        spg = dtg * 0.0 + 1.0
    dyg = dyg.to(tl.float32)
    if HAS_Z:
        zg = zg.to(tl.float32)
        sig = tl.sigmoid(zg)
        dzf = dyg * sig * (1.0 + zg * (1.0 - sig))
        dyg = dyg * zg * sig
    else:
        dzf = dyg
    tl.store(scv, dtg)
    tl.store(scv + 4 * BLOCK_D, spg)
    tl.store(scv + 8 * BLOCK_D, ug)
    tl.store(scv + 12 * BLOCK_D, dyg)
    tl.store(scv + 16 * BLOCK_D, dzf)
    return dtg, ug


@triton.jit
def _rec(h, dt, u, Bt, A2):
    """h_t from h_{t-1}: exp(Δ A) h + Δ u B_t (A2 = A log2 e)."""
    return tl.exp2(dt[:, None, None] * A2) * h + Bt * (dt * u)[:, None, None]


@triton.jit
def _adjoint_step(t, L, live, h, g, dt_next, dt, u, sp, dzf, dy, Bt, Ct, A2, Dv, dA, dDacc, dbacc, lane, dB_ptr,
                  dC_ptr, bc_offs, mask_bc, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, SHFL: tl.constexpr,
                  N: tl.constexpr):
    """One step t of the backward, from h = h_t, g = the adjoint g_{t+1} and Δ_{t+1} (dt_next); per-channel inputs
    (BLOCK_D,) fp32 as pass A staged them (_stage: Δ_t, u_t, sp = softplus', dy = dy_t silu(z_t), dzf = dz_t / y_t
    before the gate), B_t, C_t broadcast tiles. Adds dB_t and dC_t (sums over the block's channels) into dB and dC
    (each (l, n) for this batch row) and dA, dD, dΔ-bias into their accumulators (live: the channel exists and
    t < L). Returns g_t, the accumulators and du_t, dΔ_t, dz_t."""
    if HAS_Z:
        dz = (tl.sum(tl.sum(h * Ct, axis=2), axis=1) + Dv * u) * dzf
    else:
        dz = dy
    g = tl.exp2(dt_next[:, None, None] * A2) * g + Ct * dy[:, None, None]
    dtu = dt * u
    gB = tl.sum(tl.sum(g * Bt, axis=2), axis=1)
    gx = g * (h - Bt * dtu[:, None, None])  # g_t exp(Δ_t A) h_{t-1}
    dA += gx * dt[:, None, None]
    ddelta = tl.sum(tl.sum(gx * A2, axis=2), axis=1) * 0.6931471805599453 + u * gB
    if SOFTPLUS:
        ddelta *= sp
    ddelta = tl.where(live, ddelta, 0.0)
    du = dt * gB + Dv * dy
    dDacc += dy * u
    dbacc += ddelta
    dBv = g * dtu[:, None, None]
    dCv = h * dy[:, None, None]
    if SHFL:  # one value per lane after a reduce-scatter over the lanes: one coalesced atomic a step
        w, n = _lane_sum_index(lane)
        tl.atomic_add(tl.where(w == 0, dB_ptr, dC_ptr) + t * N + n, _lane_sums(dBv, dCv, lane, SHFL),
                      mask=lane * 0 + t < L, sem="relaxed")
    else:
        m = mask_bc & (bc_offs * 0 + t < L)
        tl.atomic_add(dB_ptr + t * N + bc_offs, tl.sum(dBv, axis=0), mask=m, sem="relaxed")
        tl.atomic_add(dC_ptr + t * N + bc_offs, tl.sum(dCv, axis=0), mask=m, sem="relaxed")
    return g, dA, dDacc, dbacc, du, ddelta, dz


@triton.jit
def _adjoint_sub_step(k: tl.constexpr, ts, L, h, g, dt_next, dt, u, sp, dzg, dyg, offs_k, B_ptrs, C_ptrs, sB_l, sC_l,
                      bn, mask_bn, A2, Dv, dA, dDacc, dbacc, lane, dB_ptr, dC_ptr, bc_offs, mask_bc, mask_d, du_t, dd_t,
                      dz_t, du_ptrs, ddt_ptrs, dz_ptrs, sdu_l, sddt_l, sdz_l, HAS_Z: tl.constexpr,
                      SOFTPLUS: tl.constexpr, SHFL: tl.constexpr, N: tl.constexpr, UVEC: tl.constexpr,
                      DTVEC: tl.constexpr, ZVEC: tl.constexpr):
    """Step ts + k of a sub-tile (column k of its (BLOCK_D, 4) tiles): _adjoint_step with B_t and C_t loaded, then
    du, dΔ, dz collected into their tiles or stored (_out_step). Returns g, the accumulators and the three tiles."""
    t = ts + k
    tc = tl.minimum(t, L - 1)
    live = mask_d & (lane * 0 + t < L)
    g, dA, dDacc, dbacc, du, dd, dz = _adjoint_step(
        t, L, live, h, g, dt_next, dt, u, sp, _col(dzg, offs_k, k), _col(dyg, offs_k, k),
        _load_or_zero(B_ptrs + tc * sB_l + bn, mask_bn), _load_or_zero(C_ptrs + tc * sC_l + bn, mask_bn), A2, Dv, dA,
        dDacc, dbacc, lane, dB_ptr, dC_ptr, bc_offs, mask_bc, HAS_Z, SOFTPLUS, SHFL, N)
    du_t = _out_step(du_ptrs, t, sdu_l, du, live, du_t, offs_k, k, UVEC)
    dd_t = _out_step(ddt_ptrs, t, sddt_l, dd, live, dd_t, offs_k, k, DTVEC)
    if HAS_Z:
        dz_t = _out_step(dz_ptrs, t, sdz_l, dz, live, dz_t, offs_k, k, ZVEC)
    return g, dA, dDacc, dbacc, du_t, dd_t, dz_t


@fast_launch
@triton.jit(do_not_specialize=["su_d", "sdt_d", "sz_d", "sdy_d", "sdu_d", "sddt_d", "sdz_d", "s_one"])
def _bwd_seq_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, sub_ptr, carry_ptr, scratch_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, SUBS, NSUB, NCHUNK, DBLOCKS,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_l, sC_b, sC_l, sz_b, sz_d, sz_l,
    sdy_b, sdy_d, sdy_l, sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l, s_one,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
    SHFL: tl.constexpr, EVEN_D: tl.constexpr, UVEC: tl.constexpr, DTVEC: tl.constexpr, ZVEC: tl.constexpr,
    DYVEC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
    G: tl.constexpr, PF: tl.constexpr,
):
    """Gradients of one chunk, in the forward's layout: a lane per channel with its BLOCK_N fp32 states (and their
    adjoints) in registers as (BLOCK_D, BLOCK_N // G, G) tiles, channel strides hidden from the JIT (see
    _fwd_seq_kernel). Tiles of BLOCK_T steps run last to first; per tile:
      A. from the tile's saved start state, forward through the tile, keeping the state before each sub-tile of 4
         steps in this program's scratch ((BLOCK_T // 4, BLOCK_N // G, BLOCK_D, G) fp32: 16 bytes a lane), and
         each sub-tile's per-step inputs as passes B, C use them (_stage: Δ after softplus, softplus', u, dy silu(z),
         dy silu'(z); (BLOCK_T // 4, 5, BLOCK_D, 4) fp32). u, Δ, dy, z are read here only, a sub-tile ahead;
      B, C. per sub-tile, last to first: its start state and staged inputs from the scratch, its 4 states forward
         again into registers, then 4 steps of the adjoint g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}, from the
         adjoint flowing in from the right (carry: (b, chunks, n, d)).
    So a state-step costs about 2.25 exp2 (A, B; C's exp(Δ_{t+1} A) is B's exp2 of the next step, which the
    compiler reuses, but for a sub-tile's last step). The sums over channels of dB_t and dC_t are a reduce-scatter
    over the lanes (SHFL, for 32 channels x 16 states: 1, shuffles on the GPU; 2, gathers under the interpreter; 31
    exchanges, then one atomic a lane; the lanes hold their state groups in the order _group_perm sets, and read B_t,
    C_t from the matching copy of _bwd_prep_kernel's rows) or tl.sum (else), added with relaxed fp32 atomics
    into dB and dC (b, l, n).

    Writes du, dΔ, dz in their strides (4 steps a lane at once where an input is channel-major and aligned, else a
    step at a time); per-(batch, chunk) partial sums dA (b, c, d, n),
    dD and dΔ-bias (b, c, d); and dh0 (b, n, d) from chunk 0.
    """
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_d, mask_d, n3, d3, mask3, A2, bias = _lane_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, BLOCK_D, N,
                                                          BLOCK_N, G, SHFL > 0, True)
    lane = tl.arange(0, BLOCK_D)
    NG: tl.constexpr = BLOCK_N // G
    grp3, g3 = tl.arange(0, NG)[None, :, None], tl.arange(0, G)[None, None, :]
    Dv = load_channel_vector(D_ptr, offs_d * s_one, mask_d, HAS_D)
    if SHFL:  # B, C as the launcher's _bwd_prep_kernel rows: lane copy _group_perm(lane) holds the lane's group order
        bn = _group_perm(lane)[:, None, None] * N + grp3 * G + g3
    else:  # B_t, C_t broadcast over the channels (in the lane's group order, n3)
        bn = n3 + d3 * 0
    mask_bn = (bn < N) if N != BLOCK_N else None
    B_ptrs = B_ptr + pid_b * sB_b  # + t * sB_l + bn: B_t (per use, so that the lanes' permuted groups cost 32-bit
    C_ptrs = C_ptr + pid_b * sC_b  # offsets, not four 64-bit pointers each)
    # the rows to prefetch into L1 (a lane a line: the 4 copies of a _bwd_prep_kernel row span 2 lines)
    B_row = B_ptr + pid_b * sB_b + ((lane & 1) * 32 if SHFL else offs_d * 0)
    C_row = C_ptr + pid_b * sC_b + ((lane & 1) * 32 if SHFL else offs_d * 0)
    bc_offs = tl.arange(0, NG)[:, None] * G + tl.arange(0, G)[None, :]  # (groups, G): the tl.sum path's dB_t, dC_t
    mask_bc = bc_offs < N
    dB_ptr += pid_b * L * N
    dC_ptr += pid_b * L * N
    prog = (pid_b * NCHUNK + pid_c) * DBLOCKS + pid_d
    # scratch per program: the state before each sub-tile ((BLOCK_T // 4, groups, BLOCK_D, G)), then each sub-tile's
    # staged inputs (_stage: (BLOCK_T // 4, 5, BLOCK_D, 4)); a lane's rows are 16 bytes
    prog_scr = scratch_ptr + prog * (BLOCK_T // 4 * (BLOCK_N + 20) * BLOCK_D)
    scr = prog_scr + (grp3 * BLOCK_D + lane[:, None, None] * s_one) * G + g3
    scv = prog_scr + BLOCK_T // 4 * BLOCK_N * BLOCK_D + lane[:, None] * s_one * 4 + tl.arange(0, 4)[None, :]
    offs_k = tl.arange(0, 4)
    # (BLOCK_D, 4) tiles of 4 steps; the outputs' channel addresses at step 0 (for the step-by-step stores)
    u_g = _group_ptrs(u_ptr, pid_b, offs_d, offs_k, su_b, su_d, su_l, UVEC)
    du_g = _group_ptrs(du_ptr, pid_b, offs_d, offs_k, sdu_b, sdu_d, sdu_l, UVEC)
    dt_g = _group_ptrs(dt_ptr, pid_b, offs_d, offs_k, sdt_b, sdt_d, sdt_l, DTVEC)
    ddt_g = _group_ptrs(ddt_ptr, pid_b, offs_d, offs_k, sddt_b, sddt_d, sddt_l, DTVEC)
    dy_g = _group_ptrs(dy_ptr, pid_b, offs_d, offs_k, sdy_b, sdy_d, sdy_l, DYVEC)
    du_ptrs = du_ptr + pid_b * sdu_b + offs_d * sdu_d
    ddt_ptrs = ddt_ptr + pid_b * sddt_b + offs_d * sddt_d
    if HAS_Z:
        z_g = _group_ptrs(z_ptr, pid_b, offs_d, offs_k, sz_b, sz_d, sz_l, ZVEC)
        dz_g = _group_ptrs(dz_ptr, pid_b, offs_d, offs_k, sdz_b, sdz_d, sdz_l, ZVEC)
        dz_ptrs = dz_ptr + pid_b * sdz_b + offs_d * sdz_d
    else:
        z_g, dz_g, dz_ptrs = dy_g, ddt_g, ddt_ptrs  # never used
    mask_g = None if EVEN_D else mask_d[:, None] & (offs_k[None, :] >= 0)
    g = tl.load(carry_ptr + ((pid_b * NCHUNK + pid_c) * N + n3) * DIM + d3, mask=mask3, other=0.0)
    j0 = pid_c * SUBS
    j1 = tl.minimum(j0 + SUBS, NSUB)
    t_end = tl.minimum(j1 * BLOCK_T, L)
    # Δ of the step after the chunk (0 past the sequence), for exp(Δ_{t+1} A) at the chunk's last step.
    live_e = mask_d & (offs_d * 0 + t_end < L)
    raw_e = tl.load(dt_ptr + pid_b * sdt_b + offs_d * sdt_d + t_end * sdt_l, mask=live_e, other=0.0).to(tl.float32)
    dt_next = tl.where(live_e, softplus(raw_e + bias, SOFTPLUS, FAST), 0.0)
    dA = tl.zeros((BLOCK_D, NG, G), tl.float32)
    dDacc = tl.zeros((BLOCK_D,), tl.float32)
    dbacc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(j1 - j0):
        j = j1 - 1 - i
        t0 = j * BLOCK_T
        nss = tl.cdiv(tl.minimum(BLOCK_T, L - t0), 4)
        # A: the state before each sub-tile, into the scratch (no state after the last sub-tile is needed).
        h = tl.load(sub_ptr + ((pid_b * NSUB + j) * DIM + d3) * N + n3, mask=mask3, other=0.0)
        if PF > 0:  # B and C rows into L1 (prefetch.global.L1): the first sub-tile's here, then ahead in the loop
            for k in tl.static_range(4):
                _prefetch(B_row + tl.minimum(t0 + k, L - 1) * sB_l, "L1")
                _prefetch(C_row + tl.minimum(t0 + k, L - 1) * sC_l, "L1")
        # Each sub-tile's Δ (after softplus), softplus' and u go to the scratch too, for passes B, C. u and Δ are
        # loaded a sub-tile ahead (carried unconverted; the last sub-tile may run past L).
        mask_t = (offs_k[None, :] + t0 < L) & mask_d[:, None]
        ugn = _load4(u_g, t0, su_l, L, mask_g, mask_t)
        rgn = _load4(dt_g, t0, sdt_l, L, mask_g, mask_t)
        dygn = _load4(dy_g, t0, sdy_l, L, mask_g, mask_t)
        zgn = _load4(z_g, t0, sz_l, L, mask_g, mask_t) if HAS_Z else dygn
        for s in range(nss - 1):
            tl.store(scr + s * (BLOCK_N * BLOCK_D), h)
            ts = t0 + 4 * s
            ug, rg, dyg, zg = ugn, rgn, dygn, zgn
            mask_t = (offs_k[None, :] + ts + 4 < L) & mask_d[:, None]
            ugn = _load4(u_g, ts + 4, su_l, L, mask_g, mask_t)
            rgn = _load4(dt_g, ts + 4, sdt_l, L, mask_g, mask_t)
            dygn = _load4(dy_g, ts + 4, sdy_l, L, mask_g, mask_t)
            zgn = _load4(z_g, ts + 4, sz_l, L, mask_g, mask_t) if HAS_Z else dygn
            dtg, ug = _stage(scv + s * (20 * BLOCK_D), ug, rg, dyg, zg, (offs_k[None, :] + ts < L) & mask_d[:, None],
                             bias, SOFTPLUS, FAST, HAS_Z, BLOCK_D)
            for k in tl.static_range(4):
                if PF > 0:  # B PF steps ahead for this pass, C a sub-tile ahead for pass C
                    _prefetch(B_row + tl.minimum(ts + k + PF, L - 1) * sB_l, "L1")
                    _prefetch(C_row + tl.minimum(ts + k + 4, L - 1) * sC_l, "L1")
                h = _rec(h, _col(dtg, offs_k, k), _col(ug, offs_k, k), _load_or_zero(B_ptrs + (ts + k) * sB_l + bn,
                                                                                      mask_bn), A2)
        tl.store(scr + (nss - 1) * (BLOCK_N * BLOCK_D), h)
        ts = t0 + 4 * (nss - 1)
        _stage(scv + (nss - 1) * (20 * BLOCK_D), ugn, rgn, dygn, zgn, (offs_k[None, :] + ts < L) & mask_d[:, None],
               bias, SOFTPLUS, FAST, HAS_Z, BLOCK_D)
        # B, C: per sub-tile, last to first.
        for i2 in range(nss):
            s = nss - 1 - i2
            ts = t0 + 4 * s
            mask_t = (offs_k[None, :] + ts < L) & mask_d[:, None]
            h0 = tl.load(scr + s * (BLOCK_N * BLOCK_D))
            dtg = tl.load(scv + s * (20 * BLOCK_D))
            spg = tl.load(scv + s * (20 * BLOCK_D) + 4 * BLOCK_D)
            ug = tl.load(scv + s * (20 * BLOCK_D) + 8 * BLOCK_D)
            dyg = tl.load(scv + s * (20 * BLOCK_D) + 12 * BLOCK_D)
            dzg = tl.load(scv + s * (20 * BLOCK_D) + 16 * BLOCK_D)
            u0, u1, u2, u3 = _col(ug, offs_k, 0), _col(ug, offs_k, 1), _col(ug, offs_k, 2), _col(ug, offs_k, 3)
            dt0, dt1, dt2, dt3 = _col(dtg, offs_k, 0), _col(dtg, offs_k, 1), _col(dtg, offs_k, 2), _col(dtg, offs_k, 3)
            sps = (_col(spg, offs_k, 0), _col(spg, offs_k, 1), _col(spg, offs_k, 2), _col(spg, offs_k, 3))
            t1, t2, t3 = tl.minimum(ts + 1, L - 1), tl.minimum(ts + 2, L - 1), tl.minimum(ts + 3, L - 1)
            h1 = _rec(h0, dt0, u0, _load_or_zero(B_ptrs + ts * sB_l + bn, mask_bn), A2)
            h2 = _rec(h1, dt1, u1, _load_or_zero(B_ptrs + t1 * sB_l + bn, mask_bn), A2)
            h3 = _rec(h2, dt2, u2, _load_or_zero(B_ptrs + t2 * sB_l + bn, mask_bn), A2)
            h4 = _rec(h3, dt3, u3, _load_or_zero(B_ptrs + t3 * sB_l + bn, mask_bn), A2)
            du_t, dd_t, dz_t = ug, dtg, dzg  # tiles that collect the outputs where they are stored 4 steps at once
            hs, dts, us = (h1, h2, h3, h4), (dt0, dt1, dt2, dt3, dt_next), (u0, u1, u2, u3)
            for k in tl.static_range(3, -1, -1):
                g, dA, dDacc, dbacc, du_t, dd_t, dz_t = _adjoint_sub_step(
                    k, ts, L, hs[k], g, dts[k + 1], dts[k], us[k], sps[k], dzg, dyg, offs_k, B_ptrs, C_ptrs, sB_l, sC_l,
                    bn, mask_bn, A2, Dv, dA, dDacc, dbacc, lane, dB_ptr, dC_ptr, bc_offs, mask_bc, mask_d, du_t, dd_t,
                    dz_t, du_ptrs, ddt_ptrs, dz_ptrs, sdu_l, sddt_l, sdz_l, HAS_Z, SOFTPLUS, SHFL, N, UVEC, DTVEC, ZVEC)
            dt_next = dt0
            if UVEC:
                _store4(du_g, du_t, ts, sdu_l, L, mask_g, mask_t)
            if DTVEC:
                _store4(ddt_g, dd_t, ts, sddt_l, L, mask_g, mask_t)
            if HAS_Z and ZVEC:
                _store4(dz_g, dz_t, ts, sdz_l, L, mask_g, mask_t)
    part = (pid_b * NCHUNK + pid_c) * DIM + offs_d * s_one
    tl.store(dA_ptr + part[:, None, None] * N + n3, dA, mask=mask3)
    tl.store(dD_ptr + part, dDacc, mask=mask_d)
    tl.store(dbias_ptr + part, dbacc, mask=mask_d)
    if pid_c == 0:  # dh0 = exp(Δ_0 A) g_0
        tl.store(dh0_ptr + (pid_b * N + n3) * DIM + d3, tl.exp2(dt_next[:, None, None] * A2) * g, mask=mask3)


@triton.jit
def _quad_rs(p0, p1, p2, p3, b1, b0, SHFL: tl.constexpr, M1: tl.constexpr = 2, M0: tl.constexpr = 1):
    """Reduce-scatter of 4 per-lane partial sums (of steps 0 .. 3 of a group) over the 4 lanes that differ in lane
    bits M1 and M0 (b1, b0: this lane's bits): each ends with the whole sum of the step its bits pick (3 shuffles; bit
    M1 picks steps {0, 1} or {2, 3}, bit M0 one of them). Default: a channel's 4 lanes, lane q with step q."""
    k0 = tl.where(b1, p2, p0) + _shfl_xor(tl.where(b1, p0, p2), M1, SHFL)
    k1 = tl.where(b1, p3, p1) + _shfl_xor(tl.where(b1, p1, p3), M1, SHFL)
    return tl.where(b0, k1, k0) + _shfl_xor(tl.where(b0, k0, k1), M0, SHFL)


@triton.jit
def _quad_bwd_inputs(t, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z: tl.constexpr):
    """u, raw Δ, dy and z of step t + q of the lane's channel (zeros past L), in their dtypes."""
    m = m_c & (t + q < L)
    u = tl.load(u_q + t * su_l, mask=m, other=0.0)
    raw = tl.load(dt_q + t * sdt_l, mask=m, other=0.0)
    dy = tl.load(dy_q + t * sdy_l, mask=m, other=0.0)
    z = tl.load(z_q + t * sz_l, mask=m, other=0.0) if HAS_Z else dy
    return u, raw, dy, z


@triton.jit
def _quad_bwd_tile(t, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z: tl.constexpr):
    """_quad_bwd_inputs of the 4 groups of the tile at t."""
    return (_quad_bwd_inputs(t, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z),
            _quad_bwd_inputs(t + 4, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z),
            _quad_bwd_inputs(t + 8, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z),
            _quad_bwd_inputs(t + 12, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z))


@triton.jit
def _quad_bwd_prep(inp, t, L, m_c, q, bias, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """The per-channel work of step t + q in the 4-lane backward: Δ after bias and softplus (0 past L), Δ u, u,
    softplus' (the sigmoid; 1 without softplus), the gated dy (dy silu(z)), dy silu'(z) and whether the step is live."""
    ug, rg, dyg, zg = inp
    live = m_c & (t + q < L)
    u = ug.to(tl.float32)
    r = rg.to(tl.float32) + bias
    if SOFTPLUS:
        if FAST:  # e = e^r: softplus ln(1 + e) and its derivative e / (1 + e) from one ex2 (and lg2, rcp)
            e = tl.exp2(r * 1.4426950408889634)
            e1 = e + 1.0
            dt = tl.where(r > 20.0, r, lg2_approx(e1) * 0.6931471805599453)
            sp = tl.where(r > 20.0, 1.0, e * rcp_approx(e1))
        else:
            dt = softplus(r, SOFTPLUS)
            sp = tl.where(r > 20.0, 1.0, tl.sigmoid(r))
    else:
        dt = r
        sp = tl.full(r.shape, 1.0, tl.float32)
    dt = tl.where(live, dt, 0.0)
    dy = dyg.to(tl.float32)
    if HAS_Z:
        z = zg.to(tl.float32)
        sig = sigmoid(z, FAST)
        dzf = dy * sig * (1.0 + z * (1.0 - sig))
        dy = dy * z * sig
    else:
        dzf = dy
    return dt, dt * u, u, sp, dy, dzf, live


@triton.jit
def _red_add4(ptrs, v, mask, SHFL: tl.constexpr):
    """Atomically add each lane's 4 values v (a (LANES, 4) tile) to the 4 contiguous fp32 at ptrs (LANES,), where
    mask: one red.global.add.v4.f32 a lane on the GPU (SHFL 1; sm_90 PTX), tl.atomic_add elsewhere."""
    if SHFL == 1:
        k4 = tl.arange(0, 4)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $6, 0; @p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5}; }"
            " mov.u32 $0, 0;", "=r,l,r,r,r,r,r",
            [ptrs.to(tl.int64), _col(v, k4, 0), _col(v, k4, 1), _col(v, k4, 2), _col(v, k4, 3), mask.to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(ptrs[:, None] + tl.arange(0, 4)[None, :], v, mask=mask[:, None], sem="relaxed")


@triton.jit
def _quad_adjoint_step(g, dA, e_next, e, h_before, h, Bt, Ct, dt, dtu, dy, A2):
    """One adjoint step k in the 4-lane layout (a lane's 4 states): g_k = e_{k+1} g_{k+1} + C_k dy'_k and
    gx = g_k e_k h_{k-1} (g_k exp(Δ_k A) times the state before the step; dA += gx Δ_k). Returns g_k, dA, the lane's
    parts of g·B, gx·A (log2 e) and C·h (per-channel sums over states), and its dB_t, dC_t terms (g Δu, h dy')."""
    g = e_next * g + Ct * dy[:, None]
    gx = g * e * h_before
    dA += gx * dt[:, None]
    return (g, dA, tl.sum(g * Bt, axis=1), tl.sum(gx * A2, axis=1), tl.sum(Ct * h, axis=1), g * dtu[:, None],
            h * dy[:, None])


@triton.jit
def _quad_adjoint_group(t, L, g, e_next, h0, pre, A2, Dv, dA, dDacc, dbacc, B_q, C_q, dBC_b, du_q, ddt_q, dz_q,
                        sdu_l, sddt_l, sdz_l, n2, q, lane, HAS_Z: tl.constexpr, SHFL: tl.constexpr):
    """The backward of the group of 4 steps at t in the 4-lane layout, from h0 (the state before it), its per-step
    inputs ``pre`` (_quad_bwd_prep: lane q's step t + q), g = the adjoint after it and e_next = exp(Δ A) of the step
    after it. Recomputes the group's 4 states and exps, steps the adjoint back through them, reduce-scatters the
    per-channel sums over the channel's 4 lanes (lane q: step t + q's du, dΔ, dz, stored) and dB_t, dC_t (sums over
    the warp's 8 channels) over lane bits 2 .. 4 (a vector atomic a lane). Returns g, e_next of the group's first step
    and the accumulators."""
    dtq, dtuq, uq, spq, dyq, dzfq, live = pre
    b0 = (lane & 1) != 0
    b1 = (lane & 2) != 0
    dt0, dt1, dt2, dt3 = (_shfl_quad(dtq, 0, SHFL), _shfl_quad(dtq, 1, SHFL), _shfl_quad(dtq, 2, SHFL),
                          _shfl_quad(dtq, 3, SHFL))
    du0, du1, du2, du3 = (_shfl_quad(dtuq, 0, SHFL), _shfl_quad(dtuq, 1, SHFL), _shfl_quad(dtuq, 2, SHFL),
                          _shfl_quad(dtuq, 3, SHFL))
    dy0, dy1, dy2, dy3 = (_shfl_quad(dyq, 0, SHFL), _shfl_quad(dyq, 1, SHFL), _shfl_quad(dyq, 2, SHFL),
                          _shfl_quad(dyq, 3, SHFL))
    Bg = _quad_rows(B_q + t * 16)
    Cg = _quad_rows(C_q + t * 16)
    e0 = tl.exp2(dt0[:, None] * A2)
    h1 = e0 * h0 + Bg[0] * du0[:, None]
    e1 = tl.exp2(dt1[:, None] * A2)
    h2 = e1 * h1 + Bg[1] * du1[:, None]
    e2 = tl.exp2(dt2[:, None] * A2)
    h3 = e2 * h2 + Bg[2] * du2[:, None]
    e3 = tl.exp2(dt3[:, None] * A2)
    h4 = e3 * h3 + Bg[3] * du3[:, None]
    # steps 3 .. 0
    g, dA, pb3, pa3, pc3, dB3, dC3 = _quad_adjoint_step(g, dA, e_next, e3, h3, h4, Bg[3], Cg[3], dt3, du3, dy3, A2)
    g, dA, pb2, pa2, pc2, dB2, dC2 = _quad_adjoint_step(g, dA, e3, e2, h2, h3, Bg[2], Cg[2], dt2, du2, dy2, A2)
    g, dA, pb1, pa1, pc1, dB1, dC1 = _quad_adjoint_step(g, dA, e2, e1, h1, h2, Bg[1], Cg[1], dt1, du1, dy1, A2)
    g, dA, pb0, pa0, pc0, dB0, dC0 = _quad_adjoint_step(g, dA, e1, e0, h0, h1, Bg[0], Cg[0], dt0, du0, dy0, A2)
    # lane q: step t + q
    gB = _quad_rs(pb0, pb1, pb2, pb3, b1, b0, SHFL)
    ddelta = _quad_rs(pa0, pa1, pa2, pa3, b1, b0, SHFL) * 0.6931471805599453 + uq * gB
    ddelta = tl.where(live, ddelta * spq, 0.0)
    tl.store(du_q + t * sdu_l, (dtq * gB + Dv * dyq).to(du_q.dtype.element_ty), mask=live)
    tl.store(ddt_q + t * sddt_l, ddelta.to(ddt_q.dtype.element_ty), mask=live)
    if HAS_Z:
        dz = (_quad_rs(pc0, pc1, pc2, pc3, b1, b0, SHFL) + Dv * uq) * dzfq
        tl.store(dz_q + t * sdz_l, dz.to(dz_q.dtype.element_ty), mask=live)
    dDacc += dyq * uq
    dbacc += ddelta
    # dB_t, dC_t over the warp's 8 channels: lane bit 4 keeps dB or dC, bit 3 steps {0, 1} or {2, 3}, bit 2 one
    b4 = ((lane & 16) != 0)[:, None]
    b3 = ((lane & 8) != 0)[:, None]
    b2 = ((lane & 4) != 0)[:, None]
    r0 = tl.where(b4, dC0, dB0) + _shfl_xor(tl.where(b4, dB0, dC0), 16, SHFL)
    r1 = tl.where(b4, dC1, dB1) + _shfl_xor(tl.where(b4, dB1, dC1), 16, SHFL)
    r2 = tl.where(b4, dC2, dB2) + _shfl_xor(tl.where(b4, dB2, dC2), 16, SHFL)
    r3 = tl.where(b4, dC3, dB3) + _shfl_xor(tl.where(b4, dB3, dC3), 16, SHFL)
    v = _quad_rs(r0, r1, r2, r3, b3, b2, SHFL, 8, 4)
    ts = t + ((lane >> 2) & 3)
    _red_add4(dBC_b + ts * 16 + q * 4, v, ts < L, SHFL)
    return g, e0, dA, dDacc, dbacc


@fast_launch
@triton.jit(do_not_specialize=["su_d", "sdt_d", "sz_d", "sdy_d", "sdu_d", "sddt_d", "sdz_d", "s_one"])
def _bwd_quad_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, sub_ptr, carry_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, DIM, SUBS, NSUB, NCHUNK,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sBC_b, sz_b, sz_d, sz_l, sdy_b, sdy_d, sdy_l,
    sdu_b, sdu_d, sdu_l, sddt_b, sddt_d, sddt_l, sdz_b, sdz_d, sdz_l, s_one,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr,
    LANES: tl.constexpr, SHFL: tl.constexpr,
):
    """The gradients of one chunk (_bwd_seq_kernel's job, d_state 16) in the layout of _fwd_quad_kernel: 4 lanes a
    channel, 4 states a lane, 8 channels a warp, so batch 8 x 1536 channels is 1536 warps (at 254 registers, 8 warps
    an SM, it runs fastest cut into 2 chunks: _BWD["quad"]). Tiles
    of 16 steps (_T) run last to first; per tile, all in registers (no scratch):
      A. lane q prepares step t0 + 4 s + q of each of the tile's 4 groups s (_quad_bwd_prep: softplus, its
         derivative, the gate), then from the tile's saved start state runs groups 0 .. 2 forward, keeping the state
         before each group;
      B. per group, last to first (_quad_adjoint_group): its 4 states and exps again, then 4 steps of the adjoint
         g_t = C_t dy'_t + exp(Δ_{t+1} A) g_{t+1}, from the adjoint flowing in from the right (carry).
    So a state-step costs 1.75 exp2 as written; the compilers reuse most of pass A's in pass B (~1.25). u, Δ, dy, z
    are read a tile ahead (one scalar load a lane and group each: _quad_bwd_tile)
    B, C: fp32 (b, l + 16, 16) with zero rows past l; dB_t, dC_t are added into dB, dC (b, l, 16) fp32 zeroed with
    relaxed fp32 atomics. Writes du, dΔ, dz in their strides; per-(batch, chunk) partial sums dA (b, c, d, n), dD and
    dΔ-bias (b, c, d); and dh0 (b, n, d) from chunk 0."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q, ch, m_c, chs, qs, n2, m2, A2, bias = _quad_setup(pid_d, A_ptr, bias_ptr, DIM, s_one, HAS_BIAS, LANES)
    lane = tl.arange(0, LANES)
    Dv = load_channel_vector(D_ptr, chs, m_c, HAS_D)
    u_q = u_ptr + pid_b * su_b + chs * su_d + qs * su_l
    dt_q = dt_ptr + pid_b * sdt_b + chs * sdt_d + qs * sdt_l
    dy_q = dy_ptr + pid_b * sdy_b + chs * sdy_d + qs * sdy_l
    z_q = z_ptr + pid_b * sz_b + chs * sz_d + qs * sz_l if HAS_Z else dy_q
    du_q = du_ptr + pid_b * sdu_b + chs * sdu_d + qs * sdu_l
    ddt_q = ddt_ptr + pid_b * sddt_b + chs * sddt_d + qs * sddt_l
    dz_q = dz_ptr + pid_b * sdz_b + chs * sdz_d + qs * sdz_l if HAS_Z else ddt_q
    B_q = B_ptr + pid_b * sBC_b + n2
    C_q = C_ptr + pid_b * sBC_b + n2
    dBC_b = tl.where((lane & 16) != 0, dC_ptr, dB_ptr) + pid_b * L * 16  # lane bit 4: dB or dC (see below)
    g = tl.load(carry_ptr + ((pid_b * NCHUNK + pid_c) * 16 + n2) * DIM + chs[:, None], mask=m2, other=0.0)
    j0 = pid_c * SUBS
    j1 = tl.minimum(j0 + SUBS, NSUB)
    t_end = tl.minimum(j1 * 16, L)
    live_e = m_c & (ch * 0 + t_end < L)
    raw_e = tl.load(dt_ptr + pid_b * sdt_b + chs * sdt_d + t_end * sdt_l, mask=live_e, other=0.0).to(tl.float32)
    dt_e = tl.where(live_e, softplus(raw_e + bias, SOFTPLUS, FAST), 0.0)  # Δ of the step after the chunk
    e_next = tl.exp2(dt_e[:, None] * A2)
    dA = tl.zeros((LANES, 4), tl.float32)
    dDacc = tl.zeros((LANES,), tl.float32)
    dbacc = tl.zeros((LANES,), tl.float32)
    nxt = _quad_bwd_tile((j1 - 1) * 16, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z)
    for i in range(j1 - j0):
        j = j1 - 1 - i
        t0 = j * 16
        inp = nxt
        tn = tl.maximum(t0 - 16, j0 * 16)  # the next tile's inputs (the first tile's again at the last)
        nxt = _quad_bwd_tile(tn, L, u_q, dt_q, dy_q, z_q, su_l, sdt_l, sdy_l, sz_l, m_c, q, HAS_Z)
        p0 = _quad_bwd_prep(inp[0], t0, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
        p1 = _quad_bwd_prep(inp[1], t0 + 4, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
        p2 = _quad_bwd_prep(inp[2], t0 + 8, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
        p3 = _quad_bwd_prep(inp[3], t0 + 12, L, m_c, q, bias, HAS_Z, SOFTPLUS, FAST)
        # A: the states before groups 1 .. 3 from the tile's start state
        h0 = tl.load(sub_ptr + ((pid_b * NSUB + j) * DIM + chs[:, None]) * 16 + n2, mask=m2, other=0.0)
        h1 = _quad_fwd4(h0, A2, p0, B_q + t0 * 16, SHFL)
        h2 = _quad_fwd4(h1, A2, p1, B_q + (t0 + 4) * 16, SHFL)
        h3 = _quad_fwd4(h2, A2, p2, B_q + (t0 + 8) * 16, SHFL)
        # B: the groups, last to first
        g, e_next, dA, dDacc, dbacc = _quad_adjoint_group(
            t0 + 12, L, g, e_next, h3, p3, A2, Dv, dA, dDacc, dbacc, B_q, C_q, dBC_b, du_q, ddt_q, dz_q, sdu_l,
            sddt_l, sdz_l, n2, q, lane, HAS_Z, SHFL)
        g, e_next, dA, dDacc, dbacc = _quad_adjoint_group(
            t0 + 8, L, g, e_next, h2, p2, A2, Dv, dA, dDacc, dbacc, B_q, C_q, dBC_b, du_q, ddt_q, dz_q, sdu_l,
            sddt_l, sdz_l, n2, q, lane, HAS_Z, SHFL)
        g, e_next, dA, dDacc, dbacc = _quad_adjoint_group(
            t0 + 4, L, g, e_next, h1, p1, A2, Dv, dA, dDacc, dbacc, B_q, C_q, dBC_b, du_q, ddt_q, dz_q, sdu_l,
            sddt_l, sdz_l, n2, q, lane, HAS_Z, SHFL)
        g, e_next, dA, dDacc, dbacc = _quad_adjoint_group(
            t0, L, g, e_next, h0, p0, A2, Dv, dA, dDacc, dbacc, B_q, C_q, dBC_b, du_q, ddt_q, dz_q, sdu_l,
            sddt_l, sdz_l, n2, q, lane, HAS_Z, SHFL)
    dDacc = _quad_sum(dDacc, SHFL)
    dbacc = _quad_sum(dbacc, SHFL)
    part = (pid_b * NCHUNK + pid_c) * DIM + chs
    tl.store(dA_ptr + part[:, None] * 16 + n2, dA, mask=m2)
    tl.store(dD_ptr + part, dDacc, mask=m_c & (q == 0))
    tl.store(dbias_ptr + part, dbacc, mask=m_c & (q == 0))
    if pid_c == 0:  # dh0 = exp(Δ_0 A) g_0
        tl.store(dh0_ptr + (pid_b * 16 + n2) * DIM + chs[:, None], e_next * g, mask=m2)


@triton.jit
def _quad_fwd4(h, A2, pre, p, SHFL: tl.constexpr):
    """h after the group of 4 steps whose per-step inputs are ``pre`` (_quad_bwd_prep) and B rows at p."""
    dtq, dtuq, _, _, _, _, _ = pre
    Bg = _quad_rows(p)
    h, _ = _quad_step(h, A2, dtq, dtuq, 0, Bg[0], Bg[0], SHFL)
    h, _ = _quad_step(h, A2, dtq, dtuq, 1, Bg[1], Bg[1], SHFL)
    h, _ = _quad_step(h, A2, dtq, dtuq, 2, Bg[2], Bg[2], SHFL)
    h, _ = _quad_step(h, A2, dtq, dtuq, 3, Bg[3], Bg[3], SHFL)
    return h


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
    d_blocks, nsub = cdiv(d, block_d), cdiv(l, _T)
    nchunk = _num_chunks(b * d_blocks, sm_count(device), *(policy or ()))
    subs = max(1, cdiv(nsub, min(nchunk, max(nsub, 1))))
    sizes = dict(BLOCK_D=block_d, BLOCK_T=_T, BLOCK_N=next_power_of_2(n), num_warps=warps)
    return _Plan(d_blocks, nsub, subs, max(1, cdiv(nsub, subs)), sizes)


def _num_chunks(programs: int, sms: int, unchunked_per_sm: int | None = None, chunked_per_sm: int | None = None) -> int:
    """Chunks per sequence for ``programs`` (batch x channel blocks) on ``sms`` SMs (capped by the tile count)."""
    if programs >= (unchunked_per_sm or _UNCHUNKED_PROGRAMS_PER_SM) * sms:
        return 1
    return cdiv((chunked_per_sm or _CHUNKED_PROGRAMS_PER_SM) * sms, programs)


def _nd(state: torch.Tensor) -> torch.Tensor:
    """A (b, d, n) state as the kernels keep it: fp32 (b, n, d), channels contiguous."""
    return state.to(torch.float32).transpose(1, 2).contiguous()


def _u_group(u: torch.Tensor) -> int:
    """Steps of u the forward loads at once per channel: 16 bytes where every channel's row of them is contiguous
    and 16-byte aligned (channel-major u, as the model hands it over, with 16 bytes dividing the row stride), else 1."""
    vec = 16 // u.element_size()
    ok = u.stride(2) == 1 and u.stride(1) % vec == 0 and u.stride(0) % vec == 0 and u.data_ptr() % 16 == 0
    return vec if ok else 1


def _vec4(*ts: torch.Tensor) -> bool:
    """Whether the backward may read (or write) 4 steps of each channel of these (b, d, l) tensors as one vector: time
    stride 1, 4 dividing the other strides and 4 elements dividing the address, the same strides for all."""
    t0 = ts[0]
    return all(t.stride() == t0.stride() and t.stride(2) == 1 and t.stride(0) % 4 == 0 and t.stride(1) % 4 == 0
               and t.data_ptr() % (4 * t.element_size()) == 0 for t in ts)


@triton.jit
def _bc_elems(LN, N, BLOCK: tl.constexpr):
    """This program's BLOCK elements of a (l, n) row-major step range of B or C: flat offsets, their mask, t and n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < LN, offs // N, offs % N


@fast_launch
@triton.jit
def _bc_f32_kernel(B_ptr, C_ptr, oB_ptr, oC_ptr, zB_ptr, zC_ptr, LN, LNP, N, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                   BLOCK: tl.constexpr):
    """B and C (b, n, l), any strides and dtype -> fp32 (b, lp, n) contiguous (lp >= l: rows past l zeros; LN = l n,
    LNP = lp n), in one launch (program axis 1: which): what the forward reads (16-byte vectors of a step's states, no
    conversion in its loop), and the backward where it does not use _bwd_prep_kernel; program axis 1 = 2 (launched
    by the 4-lane backward only): zeros into zB, zC (b, l, n) fp32, its dB and dC."""
    pid_b = tl.program_id(2).to(tl.int64)
    offs, m, t, nn = _bc_elems(LNP, N, BLOCK)
    if tl.program_id(1) == 2:
        tl.store(zB_ptr + pid_b * LN + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < LN)
        tl.store(zC_ptr + pid_b * LN + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < LN)
    elif tl.program_id(1) == 0:
        v = tl.load(B_ptr + pid_b * sB_b + nn * sB_n + t * sB_l, mask=offs < LN, other=0.0)
        tl.store(oB_ptr + pid_b * LNP + offs, v.to(tl.float32), mask=m)
    else:
        v = tl.load(C_ptr + pid_b * sC_b + nn * sC_n + t * sC_l, mask=offs < LN, other=0.0)
        tl.store(oC_ptr + pid_b * LNP + offs, v.to(tl.float32), mask=m)


@fast_launch
@triton.jit
def _bwd_prep_kernel(B_ptr, C_ptr, Bx_ptr, Cx_ptr, C32_ptr, dB_ptr, dC_ptr, LN, LNP, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                     N: tl.constexpr, BLOCK: tl.constexpr):
    """The backward's inputs and zeroed sums in one launch (for the reduce-scatter's group order, N 16; program axis
    1 picks the job): B and C (b, n, l), any strides and dtype, as 4 fp32 copies of each row, copy p with its groups of
    4 states in the order j ^ p ((b, l, 4 N): the lanes of _group_perm(lane) == p read that copy: one 16-byte-aligned
    run of 4 vectors a lane), C as fp32 (b, lp, n) for the local adjoint (LNP = lp n; rows past l zeros), and dB, dC
    (b, l, n) zeroed for the atomics."""
    job, pid_b = tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs, mp, t, nn = _bc_elems(LNP, N, BLOCK)
    m = offs < LN
    if job == 2:
        tl.store(dB_ptr + pid_b * LN + offs, tl.zeros((BLOCK,), tl.float32), mask=m)
        tl.store(dC_ptr + pid_b * LN + offs, tl.zeros((BLOCK,), tl.float32), mask=m)
    else:
        if job == 0:
            v = tl.load(B_ptr + pid_b * sB_b + nn * sB_n + t * sB_l, mask=m).to(tl.float32)
            x_ptr = Bx_ptr
        else:
            v = tl.load(C_ptr + pid_b * sC_b + nn * sC_n + t * sC_l, mask=m, other=0.0).to(tl.float32)
            tl.store(C32_ptr + pid_b * LNP + offs, v, mask=mp)
            x_ptr = Cx_ptr
        for p in tl.static_range(4):
            tl.store(x_ptr + pid_b * LN * 4 + t * (4 * N) + p * N + ((nn // 4) ^ p) * 4 + nn % 4, v, mask=m)


def _states_f32_pair(B: torch.Tensor, C: torch.Tensor, pad: int = 0, zeros: tuple | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """B and C (b, n, l) as fp32 with the states contiguous ((b, l + pad, n) buffers, their last ``pad`` rows zeros,
    transposed), in one kernel launch (a launch is ~1% of a b8 forward); zeros: two contiguous fp32 (b, l, n) tensors
    the same launch fills with zeros."""
    b, n, l = B.shape
    oB, oC = (torch.empty(b, l + pad, n, dtype=torch.float32, device=B.device) for _ in range(2))
    block = 1024
    zB, zC = zeros or (oB, oC)  # placeholders where there are none (that job is not launched)
    _bc_f32_kernel[(cdiv((l + pad) * n, block), 2 if zeros is None else 3, b)](
        B, C, oB, oC, zB, zC, l * n, (l + pad) * n, n, *B.stride(), *C.stride(), BLOCK=block)
    return oB.transpose(1, 2), oC.transpose(1, 2)


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
        check_row_offsets(name, t)
    if n > 256:
        raise KernelInputError(f"selective_scan supports d_state up to 256, got {n}")


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states):
    """Launch the forward. Returns y (b, d, l) in u's dtype (time-major in memory, a (b, l, d) buffer transposed, as
    out_proj wants it), the final state (b, d, n) fp32 (a (b, n, d) buffer transposed), and the state at each tile
    start (b, cdiv(l, _T), d, n) fp32 when ``save_states`` (else (b, 0, d, n))."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    h0 = None if initial_state is None else _nd(initial_state)  # (b, n, d); None: zeros, not stored
    y = torch.empty(b, l, d, dtype=u.dtype, device=u.device).transpose(1, 2)
    cuda = u.device.type == "cuda"
    quad = n == 16 and _FWD["quad"] is not None
    if quad:  # 4 lanes a channel (_fwd_quad_kernel)
        warps, *policy = _FWD["quad"]
        p = _plan(b, d, l, n, 8 * warps, warps, u.device, tuple(policy))
    else:
        p = _plan(b, d, l, n, _FWD["block_d"], _FWD["warps"], u.device)
        if p.nchunk > 1:
            p = _plan(b, d, l, n, _FWD["chunked_block_d"], _FWD["warps"], u.device)
    sub = torch.empty(b, p.nsub if save_states else 0, d, n, **f32)
    if l == 0:
        return y, (torch.zeros(b, n, d, **f32) if h0 is None else h0).transpose(1, 2), sub
    B, C = _states_f32_pair(B, C, pad=8 if quad else 0)  # quad: whole groups of 4 rows, and the next
    dims = (l, d, p.subs, p.nsub, p.nchunk)
    strides = (*u.stride(), *delta.stride())
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 FAST=cuda)  # FAST (and PF below): inline PTX, not under the interpreter
    if quad:
        kernel = _fwd_quad_kernel
        strides += (B.stride(0), *_strides(z), 1)
        flags.update(LANES=32 * warps, BLOCK_T=_T, SHFL=1 if cuda else 2, num_warps=warps)
    else:
        kernel = _fwd_seq_kernel
        strides += (B.stride(0), B.stride(2), C.stride(0), C.stride(2), *_strides(z), 1, 1)
        flags.update(EVEN_D=d % p.sizes["BLOCK_D"] == 0, N=n, G=min(p.sizes["BLOCK_N"], 4), U=_u_group(u),
                     PF=_FWD["prefetch"] if cuda else 0, **p.sizes)
        if _FWD["maxnreg"] and cuda:
            flags["maxnreg"] = _FWD["maxnreg"]
    start = y if h0 is None else h0.view(b, 1, n, d)  # y: a placeholder pointer, never read (HAS_START off)
    if p.nchunk > 1:
        local, dsum = torch.empty(b, p.nchunk, n, d, **f32), torch.empty(b, d, p.nchunk, **f32)
        # Local states of every chunk but the last (whose end state the main pass computes).
        kernel[(p.d_blocks, p.nchunk - 1, b)](u, delta, A, B, C, D, z, delta_bias, start, y, local, dsum, *dims,
                                              *strides, **flags, SAVE=False, LOCAL=True, HAS_START=False,
                                              **(dict(FAR_IN=False, L2_AHEAD=0, BC_LAST=False) if quad else {}))
        init = start
        start = torch.empty(b, p.nchunk, n, d, **f32)
        _carry_kernel[(cdiv(d, 32), b)](A, init, local, dsum, start, d, n, p.nchunk, REVERSE=False,
                                        BLOCK_D=32, BLOCK_N=next_power_of_2(n), HAS_INIT=h0 is not None)
    final = torch.empty(b, n, d, **f32)
    if quad:  # u, Δ, z 3 groups ahead in the main pass only when it saves states or runs unchunked (measured)
        flags["FAR_IN"] = _FWD["quad_far_in"] and (save_states or p.nchunk == 1)
        # the prefetch of u reads the lane's channel unmasked: only where every lane's channel exists (8 divides d)
        flags["L2_AHEAD"] = _FWD["quad_l2_ahead"] if cuda and d % 8 == 0 else 0
        flags["BC_LAST"] = _FWD["quad_bc_evict_last"]
    kernel[(p.d_blocks, p.nchunk, b)](u, delta, A, B, C, D, z, delta_bias, start, y, final, sub, *dims, *strides,
                                      **flags, SAVE=save_states, LOCAL=False, HAS_START=p.nchunk > 1 or h0 is not None)
    return y, final.transpose(1, 2), sub


def _adjoint_carry(p: _Plan, b, dy, gfinal, delta, A, C, z, delta_bias, consts, quad: bool = False) -> torch.Tensor:
    """The adjoint flowing into each chunk from its right: (b, chunks, n, d) fp32 (gfinal itself for one chunk).
    gfinal: the final state's gradient, (b, n, d) contiguous, or None for zeros. A: contiguous (d, n); C: fp32,
    n-contiguous, _C_PAD zero rows past l (_states_f32_pair)."""
    d, n = A.shape
    if p.nchunk == 1:
        if gfinal is None:
            return torch.zeros(b, 1, n, d, dtype=torch.float32, device=A.device)
        return gfinal.view(b, 1, n, d)
    f32 = dict(dtype=torch.float32, device=delta.device)
    local, dsum = torch.empty(b, p.nchunk, n, d, **f32), torch.empty(b, d, p.nchunk, **f32)
    if quad or (n == 16 and _BWD["quad_local"]):  # 4 lanes a channel
        _bwd_local_quad_kernel[(cdiv(d, 8), p.nchunk - 1, b)](
            delta, A, C, z, delta_bias, dy, local, dsum, delta.shape[2], d, p.subs, p.nchunk,
            *delta.stride(), C.stride(0), *_strides(z), *dy.stride(), 1,
            HAS_Z=consts["HAS_Z"], HAS_BIAS=consts["HAS_BIAS"], SOFTPLUS=consts["SOFTPLUS"], FAST=consts["FAST"],
            LANES=32, BLOCK_T=_T, SHFL=1 if consts["FAST"] else 2, num_warps=1,
        )
    else:
        _bwd_local_kernel[(p.d_blocks, p.nchunk - 1, b)](
            delta, A, C, z, delta_bias, dy, local, dsum, delta.shape[2], d, p.subs, p.nchunk,
            *delta.stride(), C.stride(0), C.stride(2), *_strides(z), *dy.stride(), 1, **consts, **p.sizes,
        )
    carry = torch.empty(b, p.nchunk, n, d, **f32)
    _carry_kernel[(p.d_blocks, b)](A, A if gfinal is None else gfinal, local, dsum, carry, d, n, p.nchunk,
                                   REVERSE=True, HAS_INIT=gfinal is not None, BLOCK_D=p.sizes["BLOCK_D"],
                                   BLOCK_N=p.sizes["BLOCK_N"])
    return carry


def _scan_bwd(dy, dfinal, u, delta, A, B, C, D, z, delta_bias, delta_softplus, sub):
    """Launch the backward. Returns du, dΔ, dz (b, d, l) in their inputs' dtypes and strides (dz empty without z);
    dB, dC (b, n, l) (time-major in memory) in B's and C's dtypes; and in fp32 dA (d, n), dD, dΔ-bias (d,) and dh0
    (b, d, n)."""
    b, d, l = u.shape
    n = A.shape[1]
    A, D, delta_bias = (contiguous_or_none(t) for t in (A, D, delta_bias))
    f32 = dict(dtype=torch.float32, device=u.device)
    if sub.shape != (b, cdiv(l, _T), d, n):
        raise KernelInputError("selective_scan backward needs the tile states saved by a forward with save_states")
    check_row_offsets("the gradient of y", dy)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus)
    gfinal = None if dfinal is None else _nd(dfinal)
    du, ddelta = empty_like_bdl(u), empty_like_bdl(delta)
    dz = empty_like_bdl(z) if z is not None else torch.empty(0, **f32)
    if l == 0:
        dB, dC = torch.zeros(b, l, n, **f32), torch.zeros(b, l, n, **f32)
        dh0 = torch.zeros(b, n, d, **f32) if gfinal is None else gfinal
        return (du, ddelta, torch.zeros(d, n, **f32), dB.transpose(1, 2).to(B.dtype), dC.transpose(1, 2).to(C.dtype),
                torch.zeros(d, **f32), dz, torch.zeros(d, **f32), dh0.transpose(1, 2))
    cuda = u.device.type == "cuda"
    if n == 16 and _BWD["quad"] is not None:  # 4 lanes a channel (_bwd_quad_kernel)
        parts = _scan_bwd_quad(dy, gfinal, u, delta, A, B, C, D, z, delta_bias, flags, sub, du, ddelta, dz, cuda)
        return _bwd_outputs(du, ddelta, dz, B, C, *parts)
    policy = _BWD["chunking"]
    if b * cdiv(d, _BWD["block_d"]) < sm_count(u.device):  # fewer channel blocks than SMs (batch 1)
        policy = (policy[0], _BWD["chunking_few"])
    p = _plan(b, d, l, n, _BWD["block_d"], _BWD["warps"], u.device, policy)
    block_d, block_n = p.sizes["BLOCK_D"], p.sizes["BLOCK_N"]
    # the reduce-scatter over lanes is written for 32 channels (one warp) x 16 states: shuffles on the GPU, under the
    # interpreter the same data movement as gathers (so that the CPU tests cover it); else tl.sum
    shfl = block_d == 32 and p.sizes["num_warps"] == 1 and n == 16
    if shfl:  # B, C in the reduce-scatter's group order (4 copies of each row), C in fp32, dB, dC zeroed: one launch
        Bx, Cx = (torch.empty(b, l, 4 * n, **f32) for _ in range(2))
        dB, dC = (torch.empty(b, l, n, **f32) for _ in range(2))
        C32 = torch.empty(b, l + _C_PAD, n, **f32)
        _bwd_prep_kernel[(cdiv((l + _C_PAD) * n, 1024), 3, b)](
            B, C, Bx, Cx, C32, dB, dC, l * n, (l + _C_PAD) * n, *B.stride(), *C.stride(), N=n, BLOCK=1024)
        C32 = C32.transpose(1, 2)
    else:
        dB, dC = torch.zeros(b, l, n, **f32), torch.zeros(b, l, n, **f32)
        B32, C32 = _states_f32_pair(B, C, pad=_C_PAD)
    common = dict(**flags, FAST=cuda, EVEN_D=d % block_d == 0, N=n, G=min(block_n, 4),
                  PF=_BWD["prefetch"] if cuda else 0,  # PF, FAST: inline PTX, not under the interpreter
                  DTVEC=_vec4(delta, ddelta), ZVEC=z is not None and _vec4(z, dz), DYVEC=_vec4(dy))
    carry = _adjoint_carry(p, b, dy, gfinal, delta, A, C32, z, delta_bias, common)
    scratch = torch.empty(b * p.nchunk * p.d_blocks * (_T // 4) * block_d * (block_n + 20), **f32)
    dA_part, dD_part, dbias_part = (torch.empty(b, p.nchunk, d, *extra, **f32) for extra in ((n,), (), ()))
    dh0 = torch.empty(b, n, d, **f32)
    consts = dict(common, HAS_D=D is not None, UVEC=_vec4(u, du), SHFL=(1 if cuda else 2) if shfl else 0)
    if shfl:  # its group order per lane (_group_perm): 4 copies of each row, (b, l, 64)
        B, C = Bx, Cx
        bc_strides = (B.stride(0), B.stride(1), C.stride(0), C.stride(1))
    else:
        B, C = B32, C32
        bc_strides = (B.stride(0), B.stride(2), C.stride(0), C.stride(2))
    if _BWD["maxnreg"] and cuda:
        consts["maxnreg"] = _BWD["maxnreg"]
    _bwd_seq_kernel[(p.d_blocks, p.nchunk, b)](
        u, delta, A, B, C, D, z, delta_bias, dy, sub, carry, scratch,
        du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part, dh0,
        l, d, p.subs, p.nsub, p.nchunk, p.d_blocks,
        *u.stride(), *delta.stride(), *bc_strides, *_strides(z),
        *dy.stride(), *du.stride(), *ddelta.stride(), *_strides(dz if z is not None else None), 1,
        **consts, **p.sizes,
    )
    return _bwd_outputs(du, ddelta, dz, B, C, dA_part, dB, dC, dD_part, dbias_part, dh0)


def _bwd_outputs(du, ddelta, dz, B, C, dA_part, dB, dC, dD_part, dbias_part, dh0):
    """The backward's outputs from its kernels' (_scan_bwd's order): the per-(batch, chunk) partial sums summed, dB and
    dC ((b, l, n) fp32) as (b, n, l) in B's and C's dtypes, dh0 ((b, n, d)) as (b, d, n)."""
    return (du, ddelta, dA_part.sum((0, 1)), dB.transpose(1, 2).to(B.dtype), dC.transpose(1, 2).to(C.dtype),
            dD_part.sum((0, 1)), dz, dbias_part.sum((0, 1)), dh0.transpose(1, 2))


def _scan_bwd_quad(dy, gfinal, u, delta, A, B, C, D, z, delta_bias, flags, sub, du, ddelta, dz, cuda):
    """_scan_bwd for d_state 16 with _bwd_quad_kernel (4 lanes a channel), chunked by _BWD["quad"] ((unchunked from,
    else chunked to) programs per SM), or by _BWD["quad_few"] ((below programs per SM, chunked to programs per SM)).
    gfinal: (b, n, d) contiguous or None; flags: HAS_Z, HAS_BIAS, SOFTPLUS; du, ddelta, dz: the outputs to fill.
    Returns the rest for _bwd_outputs, fp32: the dA partial sums, dB, dC (b, l, n), the dD and dΔ-bias partial sums
    and dh0 (b, n, d)."""
    b, d, l = u.shape
    n = 16
    f32 = dict(dtype=torch.float32, device=u.device)
    policy = _BWD["quad"]
    if b * cdiv(d, 8) < _BWD["quad_few"][0] * sm_count(u.device):  # few programs (batch 1): finer chunks
        policy = (policy[0], _BWD["quad_few"][1])
    p = _plan(b, d, l, n, 8, 1, u.device, policy)
    dB, dC = torch.empty(b, l, n, **f32), torch.empty(b, l, n, **f32)
    B32, C32 = _states_f32_pair(B, C, pad=_T, zeros=(dB, dC))  # whole tiles of rows, zeros past l; dB, dC zeroed
    shfl = 1 if cuda else 2
    consts = dict(**flags, FAST=cuda)
    carry = _adjoint_carry(p, b, dy, gfinal, delta, A, C32, z, delta_bias, consts, quad=True)
    dA_part, dD_part, dbias_part = (torch.empty(b, p.nchunk, d, *extra, **f32) for extra in ((n,), (), ()))
    dh0 = torch.empty(b, n, d, **f32)
    _bwd_quad_kernel[(p.d_blocks, p.nchunk, b)](
        u, delta, A, B32, C32, D, z, delta_bias, dy, sub, carry,
        du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part, dh0,
        l, d, p.subs, p.nsub, p.nchunk,
        *u.stride(), *delta.stride(), B32.stride(0), *_strides(z), *dy.stride(), *du.stride(), *ddelta.stride(),
        *_strides(dz if z is not None else None), 1,
        **consts, HAS_D=D is not None, LANES=32, SHFL=shfl, num_warps=1,
        **(dict(maxnreg=_BWD["quad_maxnreg"]) if _BWD["quad_maxnreg"] and cuda else {}),
    )
    return dA_part, dB, dC, dD_part, dbias_part, dh0


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
            u.new_empty(b, nsub, d, n, dtype=torch.float32))


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
    dz = empty_like_bdl(z) if z is not None else u.new_empty(0, **f32)
    dBC = [u.new_empty(b, l, n, dtype=t.dtype).transpose(1, 2) for t in (B, C)]
    return (empty_like_bdl(u), empty_like_bdl(delta),
            u.new_empty(d, n, **f32), dBC[0], dBC[1], u.new_empty(d, **f32), dz, u.new_empty(d, **f32),
            u.new_empty(b, n, d, **f32).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, _ = inputs
    # no zeros for the outputs without a gradient: the saved tile states never have one, and autograd would fill a
    # buffer of their size each backward (1/16 of the (b, d, l, n) states: 0.12 ms at b1 l65536 on an H100)
    ctx.set_materialize_grads(False)
    ctx.delta_softplus = delta_softplus
    ctx.optional = (D is not None, z is not None, delta_bias is not None,
                    None if initial_state is None else initial_state.dtype)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])


def _backward(ctx, dy, dfinal, _dsub, bwd=None):
    """The gradients of the forward op's inputs, from bwd (the backward op; _eager_scan: _scan_bwd itself)."""
    u, delta, A, B, C, D, z, delta_bias, sub = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = (bwd or _scan_bwd_op)(
        dy, dfinal, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, sub
    )
    has_D, has_z, has_bias, h0_dtype = ctx.optional
    return (
        du, ddelta, dA.to(A.dtype), dB, dC,
        dD.to(D.dtype) if has_D else None, dz if has_z else None, dbias.to(delta_bias.dtype) if has_bias else None,
        None, dh0.to(h0_dtype) if h0_dtype is not None else None, None,
    )


torch.library.register_autograd("mamba_kernels::selective_scan_fwd", _backward, setup_context=_setup_context)


# Eager mode: the same computation and autograd, calling _scan_fwd and _scan_bwd directly, without custom_op's
# Python dispatch layers (H100 host, torch 2.11, host time of a call at b1 d64 l64: forward op 0.456 ms against
# _scan_fwd 0.205, backward op 0.755 against _scan_bwd 0.621), which a GPU time of ~1.2 ms for forward + backward at
# batch 8 cannot hide.
_eager_scan = eager_function(_scan_fwd, _setup_context, lambda ctx, *grads: _backward(ctx, *grads, bwd=_scan_bwd),
                             non_differentiable=(2,))


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
    save = wants_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    op = pick(_scan_fwd_op, _eager_scan, _scan_fwd, save)
    y, final, _ = op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save)
    return y, final
