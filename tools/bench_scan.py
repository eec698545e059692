"""Benchmark the Triton selective scan against the plain-PyTorch reference, beside the memory and exp floors.

Usage (on a CUDA machine, from the repository root):
    PYTHONPATH=$PWD:$PWD/kernels:$PWD/tools python3 tools/bench_scan.py [--sweep] [--official SDIST_DIR]

Shapes: batch 8 x 1536 channels x 2048 tokens and batch 1 x 1536 x 65536, d_state 16, bf16, with z, D, delta bias and
softplus. Times are medians (and 10th-90th percentiles) of triton.testing.do_bench after a warm-up that is reported
apart (it includes compilation), of the call as Python runs it, and (CUDA graph ms) of the same call replayed from a
CUDA graph: the GPU's own time, without the host's (Python, autograd, launches), which a short call can exceed. Floors:
    memory: every input read once and every output written once, over the measured device copy bandwidth;
    exp:    b*d*l*n exponentials per pass over the measured exp throughput (forward 1 pass; forward+backward 2,
            the least a backward that recomputes the states can do).
--sweep first times a few program shapes at the first shape (warps a program of the d_state-16 forward, 8 channels a
warp; the d_state-16 backward's programs per SM, chunked below that) and runs the table with the fastest; then a few
chunk targets of that forward at 64k tokens. The sweep compares CUDA-graph times (the GPU's): at batch 8 the Python
call of a forward + backward is bound by the host, whose noise would pick the winner.
"""

from __future__ import annotations

import importlib
import sys
import time

import torch
import triton
import triton.language as tl

import mamba_kernels
from cuda_graph import capture
from tool_args import parser as tool_parser, require_cuda
from mamba_export.ops import selective_scan_ref

scan_module = importlib.import_module("mamba_kernels.selective_scan")


@triton.jit
def _exp_kernel(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """ITERS * 4 dependent-chain exps per element, 4 independent chains to keep the SFU busy."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = offs.to(tl.float32) * 1e-9
    b, c, d = a + 0.1, a + 0.2, a + 0.3
    for _ in range(ITERS):
        a = tl.exp(a * -0.5)
        b = tl.exp(b * -0.5)
        c = tl.exp(c * -0.5)
        d = tl.exp(d * -0.5)
    tl.store(out_ptr + offs, a + b + c + d)


def measure_exp_rate() -> float:
    """Exponentials per second that tl.exp sustains on this GPU."""
    n, iters = 1 << 22, 256
    out = torch.empty(n, device="cuda")
    ms = triton.testing.do_bench(lambda: _exp_kernel[(n // 1024,)](out, ITERS=iters, BLOCK=1024))
    return n * iters * 4 / (ms * 1e-3)


def measure_copy_bandwidth() -> float:
    """Bytes per second (read + written) of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_inputs(b: int, d: int, l: int, n: int, dtype=torch.bfloat16) -> dict:
    """Inputs as the model hands them over (time the slowest dimension for delta, z, B, C), requiring grad."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dt)

    def time_major(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    x = dict(u=rand(b, d, l), delta=time_major(rand(b, d, l, scale=0.5, shift=-0.5)),
             A=-torch.exp(rand(d, n, scale=0.5, dt=torch.float32)), B=time_major(rand(b, n, l)),
             C=time_major(rand(b, n, l)), D=rand(d, dt=torch.float32), z=time_major(rand(b, d, l)),
             delta_bias=rand(d, scale=0.5, shift=-1.0, dt=torch.float32))
    return {k: v.requires_grad_() for k, v in x.items()}


def bytes_moved(b: int, d: int, l: int, n: int, backward: bool) -> int:
    """Inputs read once and outputs written once (bf16 sequences, fp32 state)."""
    seq, bc = b * d * l * 2, b * n * l * 2
    fwd = 3 * seq + 2 * bc + seq + b * d * n * 4  # u, delta, z, B, C in; y, final state out
    bwd = 4 * seq + 2 * bc + 3 * seq + 2 * bc  # u, delta, z, dy, B, C in; du, ddelta, dz, dB, dC out
    return fwd + (bwd if backward else 0)


def time_fn(fn, runs: int | None) -> tuple[float, float, float, float]:
    """Warm-up time (first call), then median, p10, p90 in ms: of do_bench (runs None) or of ``runs`` timed calls
    (for the slow reference)."""
    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    warm = once()
    if runs is None:
        med, p10, p90 = triton.testing.do_bench(fn, quantiles=[0.5, 0.1, 0.9], rep=1000)
        return warm, med, p10, p90
    q = torch.tensor([once() for _ in range(runs)]).quantile(torch.tensor([0.5, 0.1, 0.9])).tolist()
    return warm, *q


def graph_time(fn) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph (captured after a warm-up on a side stream): the GPU's time for
    the call without the host's share (Python, autograd and launches), which bounds a short call where the host cannot
    keep up. None where the call cannot be captured."""
    try:
        graph = capture(fn)
    except RuntimeError as e:  # e.g. a synchronising call inside the captured function
        print(f"CUDA graph capture failed: {str(e).splitlines()[0][:120]}")
        return None
    ms = triton.testing.do_bench(graph.replay, quantiles=[0.5], rep=1000)
    del graph
    return ms[0] if isinstance(ms, (list, tuple)) else ms


def scan_calls(x: dict, impl):
    """The forward, and forward + backward, of ``impl`` on inputs x. The backward returns the gradients of every
    input (torch.autograd.grad), as a training step that clears them with zero_grad(set_to_none=True) gets them:
    accumulating into existing .grad tensors would add one elementwise pass per input, the same for every
    implementation (0.15 ms at b8 and 0.6 ms at 64k on an H100) and no part of a scan."""
    grad_y = torch.randn_like(x["u"])
    inputs = [v for v in x.values() if v is not None and v.requires_grad]

    def fwd():
        with torch.no_grad():
            impl(**x, delta_softplus=True)

    def fwd_bwd():
        y, h = impl(**x, delta_softplus=True)
        torch.autograd.grad([y, h], inputs, [grad_y, torch.zeros_like(h)])

    return fwd, fwd_bwd


def check_official(official) -> None:
    """The official kernel against the float64 reference on a small bf16 problem (a sanity check of the binding)."""
    x = make_inputs(2, 64, 300, 16)
    y, h = official(**x, delta_softplus=True)
    ref = selective_scan_ref(**{k: v.detach().double() for k, v in x.items()}, delta_softplus=True)
    errs = [((a.double() - r).norm() / r.norm()).item() for a, r in zip((y, h), ref)]
    print(f"official kernel vs float64 reference (b2 d64 l300 bf16): relative error y {errs[0]:.1e}, "
          f"final state {errs[1]:.1e}")


def report(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = tool_parser(__doc__)
    ap.add_argument("--sweep", action="store_true",
                    help="also time a few program shapes at the first shape and chunk counts at 64k")
    ap.add_argument("--reference-64k", action="store_true", help="also time the reference at 64k (minutes)")
    ap.add_argument("--skip-reference", action="store_true", help="time the Triton scan only")
    ap.add_argument("--official", metavar="SDIST_DIR",
                    help="also time the official state-spaces/mamba kernel, compiled from this unpacked mamba-ssm "
                         "sdist (tools/official_scan.py; about 2.5 minutes of nvcc)")
    args = ap.parse_args(argv)
    require_cuda("bench_scan")
    if args.sweep:
        best = sweep()
        set_tiles(best)
        set_forward_chunking(sweep_chunks())
        print(f"main table with the fastest program shapes {best} and {scan_module._FWD['quad'][2]} forward "
              "programs per SM when chunked")
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton "
          f"{triton.__version__}, CUDA {torch.version.cuda}")
    exp_rate, bandwidth = measure_exp_rate(), measure_copy_bandwidth()
    print(f"measured: exp {exp_rate / 1e12:.2f} T/s, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    official = None
    if args.official:
        from official_scan import load, official_scan

        t0 = time.perf_counter()
        official = official_scan(load(args.official))
        print(f"official kernel compiled in {time.perf_counter() - t0:.0f} s")
        check_official(official)
    n = 16
    rows = [["shape", "impl", "pass", "warm-up ms", "median ms", "p10-p90 ms", "CUDA graph ms", "mem floor ms",
             "exp floor ms", "GB/s", "x floor"]]
    for b, d, l, with_ref in [(8, 1536, 2048, not args.skip_reference), (1, 1536, 65536, args.reference_64k)]:
        x = make_inputs(b, d, l, n)
        impls = [("triton", mamba_kernels.selective_scan)] + ([("official", official)] if official else [])
        impls += [("reference", selective_scan_ref)] if with_ref else []
        for name, impl in impls:
            for pass_name, fn in zip(("fwd", "fwd+bwd"), scan_calls(x, impl)):
                backward = pass_name == "fwd+bwd"
                warm, med, p10, p90 = time_fn(fn, 2 if name == "reference" else None)
                graph = None if name == "reference" else graph_time(fn)
                mem_floor = bytes_moved(b, d, l, n, backward) / bandwidth * 1e3
                exp_floor = b * d * l * n * (2 if backward else 1) / exp_rate * 1e3
                rows.append([f"b{b} d{d} l{l}", name, pass_name, f"{warm:.1f}", f"{med:.3f}", f"{p10:.3f}-{p90:.3f}",
                             "-" if graph is None else f"{graph:.3f}", f"{mem_floor:.3f}", f"{exp_floor:.3f}",
                             f"{bytes_moved(b, d, l, n, backward) / (med * 1e-3) / 1e9:.0f}",
                             f"{med / max(mem_floor, exp_floor):.1f}"])
        if not with_ref and l == 65536 and not args.skip_reference:
            rows.append([f"b{b} d{d} l{l}", "reference", "-", "skipped: a Python loop over 65536 steps holding "
                         "(b, d, l, n) fp32 tensors", "", "", "", "", "", "", ""])
        del x
        torch.cuda.empty_cache()
    report(rows)
    return 0


SWEEP = [  # (forward warps: 8 channels each, 4 lanes a channel; backward programs per SM (4 lanes a channel too):
    (1, 16),  # unchunked from that many, else chunked to it; b8 d1536 is 1536 programs)
    (2, 16),
    (1, 12),
    (1, 24),
]


def set_tiles(cfg: tuple) -> None:
    """The settings d_state 16 takes: the 4-lane forward's warps a program, the 4-lane backward's chunk target."""
    scan_module._FWD["quad"] = (cfg[0], *scan_module._FWD["quad"][1:])
    scan_module._BWD["quad"] = (cfg[1], cfg[1])


def gpu_time(fn, rep: int) -> float:
    """The GPU's median ms for ``fn``: replayed from a CUDA graph, or the call itself where it cannot be captured."""
    ms = graph_time(fn)
    return triton.testing.do_bench(fn, rep=rep) if ms is None else ms


def sweep() -> tuple:
    """Time fwd and fwd+bwd (CUDA graph) at b8 d1536 l2048 for each SWEEP entry; return the fastest fwd+bwd."""
    x = make_inputs(8, 1536, 2048, 16)
    fwd, fwd_bwd = scan_calls(x, mamba_kernels.selective_scan)
    rows, best = [["fwd warps", "bwd programs/SM", "fwd ms", "fwd+bwd ms"]], (None, 1e30)
    for cfg in SWEEP:
        set_tiles(cfg)
        try:
            f, fb = gpu_time(fwd, 200), gpu_time(fwd_bwd, 300)
        except Exception as e:  # a shape that does not fit (registers, shared memory) is a result too
            rows.append([str(c) for c in cfg] + [f"failed: {type(e).__name__}", ""])
            continue
        rows.append([str(c) for c in cfg] + [f"{f:.3f}", f"{fb:.3f}"])
        best = min(best, (cfg, fb), key=lambda t: t[1])
    print("sweep (b8 d1536 l2048 bf16, CUDA-graph medians):")
    report(rows)
    return best[0]


def set_forward_chunking(target: int) -> None:
    """The d_state-16 forward's programs per SM when chunked."""
    warps, unchunked, _ = scan_module._FWD["quad"]
    scan_module._FWD["quad"] = (warps, unchunked, target)


def sweep_chunks() -> int:
    """Time fwd and fwd+bwd (CUDA graph) at b1 d1536 l65536 for a few programs-per-SM targets of the d_state-16
    forward's chunked path (the backward has its own policy); return the fastest forward's."""
    x = make_inputs(1, 1536, 65536, 16)
    fwd, fwd_bwd = scan_calls(x, mamba_kernels.selective_scan)
    rows, best = [["programs/SM", "fwd ms", "fwd+bwd ms"]], (None, 1e30)
    for target in (32, 48, 64, 96):
        set_forward_chunking(target)
        f, fb = gpu_time(fwd, 200), gpu_time(fwd_bwd, 300)
        rows.append([str(target), f"{f:.3f}", f"{fb:.3f}"])
        best = min(best, (target, f), key=lambda t: t[1])
    print("chunk sweep (b1 d1536 l65536 bf16, CUDA-graph medians):")
    report(rows)
    return best[0]


if __name__ == "__main__":
    sys.exit(main())
