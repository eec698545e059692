#!/usr/bin/env python3
"""Compile the selective-scan Triton kernels for an NVIDIA target without a GPU and count what their PTX does.

Triton lowers a kernel to TTGIR (where the register layouts are chosen) and PTX on any machine; only running it needs
a GPU. This prints, per kernel and warp count, the layouts Triton chose and how many shared-memory stores, barriers,
lane shuffles, exp2 and atomics the whole kernel's PTX holds: the counts docs/kernels.md quotes. Usage:

    .venv/bin/python tools/kernel_ptx_stats.py [--arch 90] [--block-d 32] [--dump DIR]

The counts come from the triton installed here (the GPU machine's triton may lay tensors out differently).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import triton
import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "kernels")]
scan = importlib.import_module("mamba_kernels.selective_scan")

BF16_POINTERS = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
COUNTS = {"st.shared": r"\bst\.shared", "bar.sync": r"\bbar\.sync", "shfl": r"\bshfl\.", "ex2": r"\bex2\.",
          "atom/red": r"\b(atom|red)\.global"}


def compile_to_ptx(fn, constexprs: dict, warps: int, arch: int) -> tuple[str, str]:
    """(TTGIR, PTX) of ``fn`` with bf16 sequence pointers, fp32 other pointers and i32 scalars."""
    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in BF16_POINTERS else "*fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({"num_warps": warps})
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    ap.add_argument("--block-d", type=int, default=scan._FWD["block_d"], help="channels per program")
    ap.add_argument("--dump", type=Path, help="also write each TTGIR and PTX here")
    args = ap.parse_args()
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BLOCK_D=args.block_d, BLOCK_T=scan._T,
                 BLOCK_N=16)
    kernels = {
        "_fwd_seq_kernel": (scan._fwd_seq_kernel, dict(flags, SAVE=True, LOCAL=False)),
        "_bwd_seq_kernel": (scan._bwd_seq_kernel, flags),
    }
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.block_d} channels per program, d_state 16")
    print("| kernel | warps | layouts | " + " | ".join(COUNTS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in COUNTS) + " |")
    for name, (fn, constexprs) in kernels.items():
        for warps in (1, 2):
            ttgir, ptx = compile_to_ptx(fn, constexprs, warps, args.arch)
            layouts = sorted(set(re.findall(r"#blocked\d* = #ttg\.blocked<\{sizePerThread = \[[0-9, ]+\], "
                                            r"threadsPerWarp = (\[[0-9, ]+\]), warpsPerCTA = (\[[0-9, ]+\])", ttgir)))
            layouts = [f"lanes {lanes} warps {warps_}" for lanes, warps_ in layouts]
            counts = [str(len(re.findall(pattern, ptx))) for pattern in COUNTS.values()]
            print(f"| {name} | {warps} | {'; '.join(layouts)} | " + " | ".join(counts) + " |")
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"{name}_w{warps}.ttgir").write_text(ttgir)
                (args.dump / f"{name}_w{warps}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
