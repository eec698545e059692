#!/usr/bin/env python3
"""Compile the selective-scan Triton kernels for an NVIDIA target without a GPU and count what their PTX does.

Triton lowers a kernel to TTGIR (where the register layouts are chosen) and PTX on any machine; only running it needs
a GPU. The layouts depend on what the JIT knows of the arguments: at a launch it turns every integer equal to 1 into
a constant and marks pointers and integers divisible by 16, and Triton's coalescing pass then lays tensors out along
the dimensions it can see to be contiguous (arguments in a kernel's ``do_not_specialize`` stay unknown, as at a
launch). So by default this tool compiles the kernels as the JIT specialises them
for the benchmark's call (tools/bench_scan.py: batch 8, 1536 channels, 2,048 steps, d_state 16, bf16 in the model's
strides: u channel-major, delta, z, B, C time-major); ``--unspecialized`` compiles with every integer unknown, which
is not what runs. It prints, per kernel and warp count, the layouts, the whole kernel's shared-memory stores,
barriers, lane shuffles, exp2 and atomics, and the instruction count of each PTX block that holds an exp2 (the
time loops' bodies, and the backward's set-up before its loops; ptxas changes the counts a little). Usage:

    .venv/bin/python tools/kernel_ptx_stats.py [--arch 90] [--block-d 32] [--unspecialized] [--dump DIR]

The counts come from the triton imported (put another version first on PYTHONPATH to see its choices: the GPU
machine runs triton 3.6, docs/kernels.md).
"""

from __future__ import annotations

import collections
import importlib
import re
import sys
from pathlib import Path

import triton
import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from tool_args import parser as tool_parser

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels")]
scan = importlib.import_module("mamba_kernels.selective_scan")

BF16_POINTERS = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
FWD_BF16_POINTERS = BF16_POINTERS - {"B_ptr", "C_ptr"}  # the launchers hand B and C over in fp32
COUNTS = {"st.shared": r"\bst\.shared", "bar.sync": r"\bbar\.sync", "shfl": r"\bshfl\.", "ex2": r"\bex2\.",
          "atom/red": r"\b(atom|red)\.global"}
# The integer arguments of the benchmark's b8 d1536 l2048 call (8 chunks in the forward, none in the backward's plan
# would differ only in SUBS/NCHUNK, which do not change the layouts).
B, D, L, N = 8, 1536, 2048, 16
CALL = dict(L=L, DIM=D, N=N, SUBS=8, NSUB=L // 32, NCHUNK=8, DBLOCKS=D // 32, GROUPS=4,
            su_b=D * L, su_d=L, su_l=1, sdt_b=L * D, sdt_d=1, sdt_l=D, sB_b=N * L, sB_n=1, sB_l=N,
            sC_b=N * L, sC_n=1, sC_l=N, sz_b=L * D, sz_d=1, sz_l=D, sdy_b=D * L, sdy_d=L, sdy_l=1,
            sdu_b=D * L, sdu_d=L, sdu_l=1, sddt_b=L * D, sddt_d=1, sddt_l=D, sdz_b=L * D, sdz_d=1, sdz_l=D,
            sy_d=1, s_one=1)


def compile_to_ptx(fn, constexprs: dict, warps: int, arch: int, specialize: bool,
                   bf16: set[str] = BF16_POINTERS, maxnreg: int | None = None) -> tuple[str, str]:
    """(TTGIR, PTX) of ``fn`` with the ``bf16`` pointers bf16, the other pointers fp32 and i32 scalars; with
    ``specialize``, the benchmark call's unit integers as constants and its divisibility-16 arguments marked, as the
    JIT does."""
    fn = getattr(fn, "fn", fn)  # the JITFunction inside mamba_kernels' FastKernel wrapper
    names = fn.arg_names
    signature, consts, attrs = {}, {}, {}
    unspecialised = {names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    for i, name in enumerate(names):
        value = None if name in unspecialised else CALL.get(name)
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in bf16 else "*fp32"
            if specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif specialize and value == 1:
            signature[name], consts[(i,)] = "constexpr", 1
        else:
            signature[name] = "i32"
            if specialize and value is not None and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    ttgir = stages["ttgir"](stages["ttir"](module, {}), {})
    ttgir_text = str(ttgir)  # the next stage lowers the module in place
    ptx = stages["ptx"](stages["llir"](ttgir, {}), {})
    return ttgir_text, ptx


def loop_blocks(ptx: str) -> list[tuple[str, collections.Counter]]:
    """Per PTX basic block that holds an exp2 (the time loops' bodies, the backward's set-up): its label and
    instruction counts by opcode."""
    blocks: dict[str, list[str]] = {"entry": []}
    current = "entry"
    for line in ptx.splitlines():
        s = line.strip()
        label = re.match(r"^(\$L__BB\d+_\d+):", s)
        if label:
            current = label.group(1)
            blocks[current] = []
            continue
        s = re.sub(r"^@!?%p\d+\s+", "", s)
        if s and s[0] not in "/.{}$":
            blocks[current].append(".".join(s.split()[0].rstrip(";").split(".")[:2]))
    return [(k, collections.Counter(ops)) for k, ops in blocks.items() if "ex2.approx" in ops and k != "entry"]


def main() -> None:
    ap = tool_parser(__doc__)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    ap.add_argument("--block-d", type=int, default=scan._FWD["block_d"], help="channels per program")
    ap.add_argument("--unspecialized", action="store_true", help="every integer argument unknown (not what runs)")
    ap.add_argument("--dump", type=Path, help="also write each TTGIR and PTX here")
    args = ap.parse_args()
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=args.block_d, BLOCK_T=scan._T,
                 BLOCK_N=16)
    kernels = {  # name: (kernel, constexprs, bf16 pointers)
        "_fwd_seq_kernel": (scan._fwd_seq_kernel, dict(flags, SAVE=True, LOCAL=False, HAS_START=True, FAST=True,
                                                       EVEN_D=True, N=16, G=4, U=8, PF=scan._FWD["prefetch"]),
                            FWD_BF16_POINTERS),
        "_bwd_local_kernel": (scan._bwd_local_kernel, dict(flags, FAST=True, EVEN_D=True, N=16, G=4, DTVEC=False,
                                                           ZVEC=False, DYVEC=True, PF=scan._BWD["prefetch"]),
                              FWD_BF16_POINTERS),
        "_bwd_seq_kernel": (scan._bwd_seq_kernel, dict(flags, FAST=True, SHFL=True, EVEN_D=True, N=16, G=4, UVEC=True,
                                                       DTVEC=False, ZVEC=False, DYVEC=True,
                                                       PF=scan._BWD["prefetch"]),
                              FWD_BF16_POINTERS),
    }
    how = "every integer unknown" if args.unspecialized else f"specialised as for b{B} d{D} l{L} bf16 (model strides)"
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.block_d} channels per program, d_state 16, {how}")
    print("| kernel | warps | layouts | " + " | ".join(COUNTS) + " | blocks with exp2: instructions (shfl, bar.sync) |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in COUNTS) + " | --- |")
    for name, (fn, constexprs, bf16) in kernels.items():
        for warps in ((1, 2) if name == "_fwd_seq_kernel" else (1,)):  # the backward is written for one warp
            ttgir, ptx = compile_to_ptx(fn, constexprs, warps, args.arch, not args.unspecialized, bf16)
            layouts = sorted(set(re.findall(r"#blocked\d* = #ttg\.blocked<\{sizePerThread = (\[[0-9, ]+\]), "
                                            r"threadsPerWarp = (\[[0-9, ]+\]), warpsPerCTA = (\[[0-9, ]+\])", ttgir)))
            layouts = [f"per thread {size} lanes {lanes} warps {warps_}" for size, lanes, warps_ in layouts]
            counts = [str(len(re.findall(pattern, ptx))) for pattern in COUNTS.values()]
            loops = ", ".join(f"{sum(c.values())} ({c['shfl.sync']}, {c['bar.sync']})" for _, c in loop_blocks(ptx))
            print(f"| {name} | {warps} | {'; '.join(layouts)} | " + " | ".join(counts) + f" | {loops} |")
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"{name}_w{warps}.ttgir").write_text(ttgir)
                (args.dump / f"{name}_w{warps}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
