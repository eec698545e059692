"""Benchmark the Triton causal conv1d (+ SiLU), forward and forward + backward, beside PyTorch's depthwise conv1d.

Inputs as the model hands them over: x (b, d, l) bf16 time-major (a slice of in_proj's output), weight (d, 4), bias,
no incoming state. Times are medians of `triton.testing.do_bench` over CUDA-graph replays (the GPU's time, without
the host's). The backward returns the gradients of x, weight and bias through `torch.autograd.grad`. Memory floor:
x read and y written once (forward), plus dy read and dx written (backward), over the measured copy bandwidth.
`--baseline FILE` also times another causal_conv1d.py (e.g. an earlier version of ours) in the same run.

    PYTHONPATH=$PWD:$PWD/kernels:$PWD/tools python3 tools/bench_conv.py [--baseline FILE]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import mamba_kernels
from bench_scan import graph_time, measure_copy_bandwidth
from tool_args import parser as tool_parser, require_cuda
from mamba_export.ops import causal_conv1d_ref

SHAPES = [(8, 1536, 2048), (32, 512, 256), (1, 1536, 65536)]


def torch_conv(x, weight, bias):
    """PyTorch's depthwise conv1d (cuDNN) with left padding, then SiLU; weight and bias cast to x's dtype, as autocast
    does."""
    k = weight.shape[1]
    w, b = weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype)
    return F.silu(F.conv1d(x, w, b, padding=k - 1, groups=x.shape[1])[..., :x.shape[2]])


def load_baseline(path: str):
    """causal_conv1d of another copy of mamba_kernels/causal_conv1d.py, its torch.library ops renamed apart."""
    import types

    mod = types.ModuleType("mamba_kernels._baseline_conv")
    mod.__package__ = "mamba_kernels"
    sys.modules[mod.__name__] = mod
    src = open(path).read().replace('"mamba_kernels::', '"mamba_kernels_baseline::')
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod.causal_conv1d


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--baseline", metavar="FILE", help="another causal_conv1d.py to time in the same run")
    args = ap.parse_args()
    require_cuda("bench_conv")
    impls = {"ours": lambda x, w, b: mamba_kernels.causal_conv1d(x, w, b, None, True)[0],
             "torch": lambda x, w, b: torch_conv(x, w, b)}
    if args.baseline:
        base = load_baseline(args.baseline)
        impls["baseline"] = lambda x, w, b: base(x, w, b, None, True)[0]
    props = torch.cuda.get_device_properties(0)
    bw = measure_copy_bandwidth()
    print(f"card: {props.name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print("shape             impl      fwd ms  fwd floor  x floor   fwd+bwd ms  fwd+bwd floor  x floor")
    for b, d, l in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        xz = torch.randn(b, l, 2 * d, device="cuda", generator=g).to(torch.bfloat16)
        x = xz[:, :, :d].transpose(1, 2).detach().requires_grad_()
        w = (torch.randn(d, 4, device="cuda", generator=g) * 0.5).requires_grad_()
        bias = torch.randn(d, device="cuda", generator=g).requires_grad_()
        dy = torch.randn(b, d, l, device="cuda", generator=g).to(torch.bfloat16)
        ref = causal_conv1d_ref(x.detach()[:1, :, :512].double(), w.detach().double(), bias.detach().double())[0]
        n = b * d * l
        floors = (4 * n / bw * 1e3, 10 * n / bw * 1e3)
        for name, fn in impls.items():
            got = fn(x.detach()[:1, :, :512], w.detach(), bias.detach()).double()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, err)

            def fwd():
                with torch.no_grad():
                    fn(x, w, bias)

            def fwd_bwd():
                torch.autograd.grad(fn(x, w, bias), [x, w, bias], dy)

            tf, tb = graph_time(fwd), graph_time(fwd_bwd)
            print(f"b{b} d{d} l{l:<6d} {name:8s} {tf:8.4f}  {floors[0]:9.4f}  {tf / floors[0]:6.1f}   {tb:10.4f}  "
                  f"{floors[1]:13.4f}  {tb / floors[1]:6.1f}")


if __name__ == "__main__":
    main()
