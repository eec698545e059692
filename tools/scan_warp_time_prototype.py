#!/usr/bin/env python3
"""A dropped forward-scan design, kept so that its measurement can be repeated: time across the lanes of a warp.

One warp per channel (d_state 16); each lane holds 16 consecutive steps, so a block is 512 steps. Per state: the
lane's local end state from zero, one exp of the lane's sum of delta for its decay product, a 5-level shfl.up scan of
(decay, state) over the lanes with the previous block's end state folded into lane 0, then the lane's 16 steps again
from its true start state with the exps kept in registers and y += C h. One exp per state and step, no chunks, no sum
over lanes per step; ~9.5 SASS instructions a state-step, but on an H100 0.566 ms at batch 8 x 1536 x 2048 against
0.221 for the committed kernel (BENCHMARKS.md section 5, docs/kernels.md: its dependent chains leave issue ~20% busy).
Inputs: u, delta, z (b, d, l) with time contiguous; B, C staged (b, 16, l) fp32; y (b, d, l) channel-major.

Usage, from the repository root:
    PYTHONPATH=$PWD:$PWD/kernels:$PWD/tools TRITON_INTERPRET=1 python3 tools/scan_warp_time_prototype.py --check
    PYTHONPATH=$PWD:$PWD/kernels:$PWD/tools python3 tools/scan_warp_time_prototype.py --bench   # CUDA GPU
--check runs small shapes under the interpreter (or on the GPU) against the float64 reference; --bench times it at
b8 d1536 l2048 against the committed forward in the same run (CUDA-graph medians) beside the exp floor. The variants
with 2 or 4 warps a program (--warps) are right under triton 3.9's layouts and wrong under 3.6's.
"""

from __future__ import annotations

import statistics
import sys

import triton
import triton.language as tl

from mamba_kernels._triton_common import softplus, silu, load_channel_vector


@triton.jit
def _pick(tile, kk, k: tl.constexpr):
    """Element k of the per-thread axis 2 of a (W, 32, 4) tile: folds to a register read."""
    return tl.sum(tl.where(kk == k, tile, -0.0), axis=2)


@triton.jit
def _put(tile, kk, k: tl.constexpr, v):
    return tl.where(kk == k, v[:, :, None], tile)


@triton.jit
def _lin(p1, h1, p2, h2):
    return p1 * p2, p2 * h1 + h2


@triton.jit
def _warp_scan(hl, P, c, SHFL: tl.constexpr):
    """hl: the lane's local end state (from zero), P: its decay product, c: the previous block's end state (every
    lane). Returns (the lane's true start state, this block's end state on every lane)."""
    if SHFL == 1:
        hs, cn = tl.inline_asm_elementwise(
            """{
            .reg .pred p, q; .reg .f32 h, pp, t, s; .reg .u32 l;
            mov.b32 h, $2; mov.b32 pp, $3;
            mov.u32 l, %laneid; setp.eq.u32 q, l, 0;
            @q fma.rn.f32 h, pp, $4, h;
            shfl.sync.up.b32 t|p, h, 1, 0, -1; shfl.sync.up.b32 s, pp, 1, 0, -1;
            @p fma.rn.f32 h, pp, t, h; @p mul.f32 pp, pp, s;
            shfl.sync.up.b32 t|p, h, 2, 0, -1; shfl.sync.up.b32 s, pp, 2, 0, -1;
            @p fma.rn.f32 h, pp, t, h; @p mul.f32 pp, pp, s;
            shfl.sync.up.b32 t|p, h, 4, 0, -1; shfl.sync.up.b32 s, pp, 4, 0, -1;
            @p fma.rn.f32 h, pp, t, h; @p mul.f32 pp, pp, s;
            shfl.sync.up.b32 t|p, h, 8, 0, -1; shfl.sync.up.b32 s, pp, 8, 0, -1;
            @p fma.rn.f32 h, pp, t, h; @p mul.f32 pp, pp, s;
            shfl.sync.up.b32 t|p, h, 16, 0, -1;
            @p fma.rn.f32 h, pp, t, h;
            shfl.sync.up.b32 t|p, h, 1, 0, -1;
            selp.f32 $0, t, $4, p;
            shfl.sync.idx.b32 $1, h, 31, 31, -1;
            }""",
            "=r,=r,r,r,r", [hl, P, c], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lane = tl.arange(0, 32)[None, :]
        hl = tl.where(lane == 0, P * c + hl, hl)
        _, hi = tl.associative_scan((P, hl), 1, _lin)
        prev = tl.gather(hi, tl.maximum(lane - 1, 0) + hi.to(tl.int32) * 0, 1)
        hs = tl.where(lane == 0, c, prev)
        cn = tl.sum(tl.where(lane == 31, hi, 0.0), axis=1)[:, None] + hi * 0.0
    return hs, cn


@triton.jit
def _quad_load(p, m, EVEN: tl.constexpr):
    if EVEN:
        v = tl.load(p)
    else:
        v = tl.load(p, mask=m, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _tscan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, start_ptr, y_ptr, final_ptr,
                      L, LP, DIM, s_b, s_d,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      HAS_START: tl.constexpr, FAST: tl.constexpr, SHFL: tl.constexpr, W: tl.constexpr,
                      EVEN: tl.constexpr):
    pid_d, pid_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    wi = tl.arange(0, W)[:, None, None]
    lane = tl.arange(0, 32)[None, :, None]
    kk = tl.arange(0, 4)[None, None, :]
    ch = pid_d * W + wi  # (W, 1, 1)
    chv = pid_d * W + tl.arange(0, W)
    bias = load_channel_vector(bias_ptr, chv, chv < DIM, HAS_BIAS)[:, None, None]
    Dv = load_channel_vector(D_ptr, chv, chv < DIM, HAS_D)[:, None, None]
    zero = tl.zeros((W, 32, 4), tl.float32)
    # A log2 e of state 4q + k in tile q (every lane), the carries likewise
    A0 = tl.load(A_ptr + ch * 16 + kk + lane * 0).to(tl.float32) * 1.4426950408889634
    A1 = tl.load(A_ptr + ch * 16 + 4 + kk + lane * 0).to(tl.float32) * 1.4426950408889634
    A2 = tl.load(A_ptr + ch * 16 + 8 + kk + lane * 0).to(tl.float32) * 1.4426950408889634
    A3 = tl.load(A_ptr + ch * 16 + 12 + kk + lane * 0).to(tl.float32) * 1.4426950408889634
    if HAS_START:
        sp = start_ptr + (pid_b * 16 + kk) * DIM + ch + lane * 0
        c0 = tl.load(sp)
        c1 = tl.load(sp + 4 * DIM)
        c2 = tl.load(sp + 8 * DIM)
        c3 = tl.load(sp + 12 * DIM)
    else:
        c0, c1, c2, c3 = zero, zero, zero, zero
    seq = pid_b * s_b + ch * s_d + lane * 16 + kk  # (W, 32, 4): quad 0 of each lane's 16 steps
    bc = pid_b * 16 * LP + lane * 16 + kk + wi * 0
    for t0 in range(0, L, 512):
        tq = t0 + lane * 16 + kk
        m0, m1, m2, m3 = tq < L, tq + 4 < L, tq + 8 < L, tq + 12 < L
        r0 = _quad_load(dt_ptr + seq + t0, m0, EVEN) + bias
        r1 = _quad_load(dt_ptr + seq + t0 + 4, m1, EVEN) + bias
        r2 = _quad_load(dt_ptr + seq + t0 + 8, m2, EVEN) + bias
        r3 = _quad_load(dt_ptr + seq + t0 + 12, m3, EVEN) + bias
        d0 = softplus(r0, SOFTPLUS, FAST)
        d1 = softplus(r1, SOFTPLUS, FAST)
        d2 = softplus(r2, SOFTPLUS, FAST)
        d3 = softplus(r3, SOFTPLUS, FAST)
        if not EVEN:
            d0, d1, d2, d3 = tl.where(m0, d0, 0.0), tl.where(m1, d1, 0.0), tl.where(m2, d2, 0.0), tl.where(m3, d3, 0.0)
        u0 = _quad_load(u_ptr + seq + t0, m0, EVEN)
        u1 = _quad_load(u_ptr + seq + t0 + 4, m1, EVEN)
        u2 = _quad_load(u_ptr + seq + t0 + 8, m2, EVEN)
        u3 = _quad_load(u_ptr + seq + t0 + 12, m3, EVEN)
        e0, e1, e2, e3 = d0 * u0, d1 * u1, d2 * u2, d3 * u3
        y0, y1, y2, y3 = Dv * u0, Dv * u1, Dv * u2, Dv * u3
        dsum = tl.sum(d0 + d1 + d2 + d3, axis=2)  # (W, 32)
        for n in tl.static_range(16):
            if n // 4 == 0:
                An = _pick(A0, kk, n % 4)
                cn = _pick(c0, kk, n % 4)
            elif n // 4 == 1:
                An = _pick(A1, kk, n % 4)
                cn = _pick(c1, kk, n % 4)
            elif n // 4 == 2:
                An = _pick(A2, kk, n % 4)
                cn = _pick(c2, kk, n % 4)
            else:
                An = _pick(A3, kk, n % 4)
                cn = _pick(c3, kk, n % 4)
            bp = B_ptr + bc + n * LP + t0
            a0 = tl.exp2(d0 * An[:, :, None])
            a1 = tl.exp2(d1 * An[:, :, None])
            a2 = tl.exp2(d2 * An[:, :, None])
            a3 = tl.exp2(d3 * An[:, :, None])
            b0 = e0 * _quad_load(bp, m0, EVEN)
            b1 = e1 * _quad_load(bp + 4, m1, EVEN)
            b2 = e2 * _quad_load(bp + 8, m2, EVEN)
            b3 = e3 * _quad_load(bp + 12, m3, EVEN)
            h = _pick(b0, kk, 0)
            for k in tl.static_range(1, 4):
                h = _pick(a0, kk, k) * h + _pick(b0, kk, k)
            for k in tl.static_range(4):
                h = _pick(a1, kk, k) * h + _pick(b1, kk, k)
            for k in tl.static_range(4):
                h = _pick(a2, kk, k) * h + _pick(b2, kk, k)
            for k in tl.static_range(4):
                h = _pick(a3, kk, k) * h + _pick(b3, kk, k)
            P = tl.exp2(dsum * An)
            h, cn = _warp_scan(h, P, cn, SHFL)
            cp = C_ptr + bc + n * LP + t0
            H = zero
            for k in tl.static_range(4):
                h = _pick(a0, kk, k) * h + _pick(b0, kk, k)
                H = _put(H, kk, k, h)
            y0 += _quad_load(cp, m0, EVEN) * H
            for k in tl.static_range(4):
                h = _pick(a1, kk, k) * h + _pick(b1, kk, k)
                H = _put(H, kk, k, h)
            y1 += _quad_load(cp + 4, m1, EVEN) * H
            for k in tl.static_range(4):
                h = _pick(a2, kk, k) * h + _pick(b2, kk, k)
                H = _put(H, kk, k, h)
            y2 += _quad_load(cp + 8, m2, EVEN) * H
            for k in tl.static_range(4):
                h = _pick(a3, kk, k) * h + _pick(b3, kk, k)
                H = _put(H, kk, k, h)
            y3 += _quad_load(cp + 12, m3, EVEN) * H
            if n // 4 == 0:
                c0 = _put(c0, kk, n % 4, cn)
            elif n // 4 == 1:
                c1 = _put(c1, kk, n % 4, cn)
            elif n // 4 == 2:
                c2 = _put(c2, kk, n % 4, cn)
            else:
                c3 = _put(c3, kk, n % 4, cn)
        if HAS_Z:
            y0 *= silu(_quad_load(z_ptr + seq + t0, m0, EVEN), FAST)
            y1 *= silu(_quad_load(z_ptr + seq + t0 + 4, m1, EVEN), FAST)
            y2 *= silu(_quad_load(z_ptr + seq + t0 + 8, m2, EVEN), FAST)
            y3 *= silu(_quad_load(z_ptr + seq + t0 + 12, m3, EVEN), FAST)
        yp = y_ptr + seq + t0
        ty = y_ptr.dtype.element_ty
        if EVEN:
            tl.store(yp, y0.to(ty))
            tl.store(yp + 4, y1.to(ty))
            tl.store(yp + 8, y2.to(ty))
            tl.store(yp + 12, y3.to(ty))
        else:
            tl.store(yp, y0.to(ty), mask=m0)
            tl.store(yp + 4, y1.to(ty), mask=m1)
            tl.store(yp + 8, y2.to(ty), mask=m2)
            tl.store(yp + 12, y3.to(ty), mask=m3)
    fp = final_ptr + (pid_b * 16 + kk) * DIM + ch + lane * 0
    first = lane == 0
    tl.store(fp, c0, mask=first)
    tl.store(fp + 4 * DIM, c1, mask=first)
    tl.store(fp + 8 * DIM, c2, mask=first)
    tl.store(fp + 12 * DIM, c3, mask=first)


def stage_bc(B, C):
    """B, C (b, 16, l) any strides and dtype -> fp32 (b, 16, lp) contiguous, lp = l rounded up to 16, zeros past l."""
    import torch

    b, n, l = B.shape
    lp = -(-l // 16) * 16
    out = [torch.zeros(b, n, lp, dtype=torch.float32, device=B.device) for _ in range(2)]
    out[0][:, :, :l], out[1][:, :, :l] = B, C
    return out


def launcher(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, initial_state=None, warps=1):
    """(go, y, final): go() runs the kernel alone on B, C staged beforehand, writing y (b, d, l) in u's dtype and
    layout and the final state (b, 16, d) fp32. u, delta, z (b, d, l) with time contiguous and the same strides; d a
    multiple of ``warps``."""
    import torch

    b, d, l = u.shape
    if A.shape[1] != 16 or d % warps or u.stride(2) != 1 or delta.stride() != u.stride() or (
            z is not None and z.stride() != u.stride()):
        raise ValueError("the prototype takes d_state 16, channel-major u, delta, z of equal strides, and d a "
                         "multiple of the warps")
    Bs, Cs = stage_bc(B, C)
    y = torch.empty_like(u)
    final = torch.empty(b, 16, d, dtype=torch.float32, device=u.device)
    start = final if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
    cuda = u.device.type == "cuda"

    def go():
        _tscan_fwd_kernel[(d // warps, b)](
            u, delta, A.contiguous(), Bs, Cs, D, z if z is not None else u, delta_bias, start, y, final, l, Bs.shape[2],
            d, u.stride(0), u.stride(1), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_START=initial_state is not None, FAST=cuda, SHFL=1 if cuda else 2, W=warps,
            EVEN=l % 512 == 0, num_warps=warps)
    return go, y, final


def check(device: str, warps: int) -> bool:
    """Small shapes against the float64 reference (fp32 and bf16, an initial state, without z, a ragged last block)."""
    import torch

    from mamba_export.ops import selective_scan_ref

    ok = True
    for b, d, l, dtype, start, with_z in [(2, 8, 700, torch.float32, True, True), (1, 4, 1024, torch.float32, False,
                                                                                   False),
                                          (1, 4, 300, torch.bfloat16, False, True)]:
        g = torch.Generator().manual_seed(0)

        def r(*s, sc=1.0, sh=0.0):
            return torch.randn(*s, generator=g) * sc + sh

        x = dict(u=r(b, d, l).to(dtype), delta=r(b, d, l, sc=0.5, sh=-0.5).to(dtype), A=-torch.exp(r(d, 16, sc=0.5)),
                 B=r(b, 16, l).to(dtype), C=r(b, 16, l).to(dtype), D=r(d), z=r(b, d, l).to(dtype) if with_z else None,
                 delta_bias=r(d, sc=0.5, sh=-1.0))
        h0 = r(b, d, 16) if start else None
        ref_y, ref_h = selective_scan_ref(**{k: None if v is None else v.double() for k, v in x.items()},
                                          delta_softplus=True, initial_state=None if h0 is None else h0.double())
        xd = {k: None if v is None else v.to(device) for k, v in x.items()}
        go, y, final = launcher(**xd, initial_state=None if h0 is None else h0.to(device), warps=min(warps, d))
        go()
        ey = ((y.double().cpu() - ref_y).norm() / ref_y.norm()).item()
        eh = ((final.transpose(1, 2).double().cpu() - ref_h).norm() / ref_h.norm()).item()
        bound = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: y is rounded to bf16
        ok &= ey < bound and eh < 1e-5
        print(f"b{b} d{d} l{l} {str(dtype)[6:]} start={start} z={with_z}: y {ey:.2e}, final state {eh:.2e}"
              f" (bound {bound:g})")
    return ok


def bench(warps: int) -> None:
    """b8 d1536 l2048 bf16 (z, D, delta bias, softplus): the prototype on channel-major inputs against the committed
    forward on the model's layout, CUDA-graph medians, beside the exp floor."""
    from bench_scan import graph_time, make_inputs, measure_exp_rate
    from mamba_kernels.selective_scan import selective_scan

    b, d, l = 8, 1536, 2048
    floor = b * d * l * 16 / measure_exp_rate() * 1e3
    x = {k: v.detach() for k, v in make_inputs(b, d, l, 16).items()}
    base = graph_time(lambda: selective_scan(**x, delta_softplus=True))
    y_ref, h_ref = selective_scan(**x, delta_softplus=True)
    xc = {k: v.contiguous() if v.dim() == 3 else v for k, v in x.items()}  # u, delta, z channel-major
    go, y, final = launcher(**xc, warps=warps)
    go()
    times = [graph_time(go) for _ in range(3)]
    diff = ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
    print(f"b{b} d{d} l{l} bf16, exp floor {floor:.4f} ms")
    print(f"committed forward: {base:.4f} ms ({base / floor:.2f}x the floor)")
    print(f"prototype, {warps} warp(s) a program: {statistics.median(times):.4f} ms (min {min(times):.4f}; "
          f"{statistics.median(times) / floor:.2f}x the floor); y differs from the committed kernel's by {diff:.1e}")


def main() -> int:
    from tool_args import parser as tool_parser, positive_int, require_cuda

    ap = tool_parser(__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="small shapes against the float64 reference")
    what.add_argument("--bench", action="store_true", help="time it against the committed forward (CUDA GPU)")
    ap.add_argument("--warps", type=positive_int, default=1, help="warps (channels) a program (default 1)")
    args = ap.parse_args()
    import torch

    if args.bench:
        require_cuda("scan_warp_time_prototype --bench")
        bench(args.warps)
        return 0
    return 0 if check("cuda" if torch.cuda.is_available() else "cpu", args.warps) else 1


if __name__ == "__main__":
    sys.exit(main())
