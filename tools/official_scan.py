"""Optional baseline for tools/bench_scan.py: the official state-spaces/mamba selective-scan CUDA kernel.

Nothing of it is in this repository. Given the mamba-ssm sdist unpacked somewhere (``pip download`` cannot fetch it
without building it; take the .tar.gz from PyPI), :func:`load` compiles its ``csrc/selective_scan`` for the current
GPU's architecture only (with the upstream nvcc flags) via ``torch.utils.cpp_extension.load`` (about 2.5 minutes on
16 cores), and :func:`official_scan` calls it with the contract of ``mamba_export.ops.selective_scan_ref``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_FLAGS = [
    "-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
]


def load(sdist: str | Path, build_dir: str | Path = "/tmp/official_scan_build"):
    """Compile (or reuse) the official selective_scan extension from an unpacked mamba-ssm sdist."""
    src = Path(sdist) / "csrc" / "selective_scan"
    if not (src / "selective_scan.cpp").is_file():
        raise FileNotFoundError(f"{src} has no selective_scan.cpp: pass an unpacked mamba-ssm sdist")
    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    sources = [str(src / "selective_scan.cpp")] + sorted(str(p) for p in src.glob("selective_scan_*.cu"))
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(
        "official_selective_scan", sources, extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=_FLAGS + [arch], extra_include_paths=[str(src)], build_directory=str(build_dir),
        verbose=False,
    )


class _OfficialScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        # The kernel needs time-contiguous u, delta, z, B, C and B, C as (b, groups, n, l).
        u, delta, z = u.contiguous(), delta.contiguous(), z.contiguous()
        B, C = B.contiguous().unsqueeze(1), C.contiguous().unsqueeze(1)
        out, x, out_z = module.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.module, ctx.delta_softplus = module, delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        return out_z, x[:, :, -1, 1::2]

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = ctx.module.bwd(
            u, delta, A, B, C, D, z, delta_bias, dy.contiguous(), x, out, None, ctx.delta_softplus, False
        )[:8]
        return None, du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD, dz, ddelta_bias, None


def official_scan(module):
    """A function with the call signature of ``mamba_kernels.selective_scan`` (z, D and the Δ bias required; no
    initial state: the official kernel starts from zero) that runs the official kernel through ``module``."""

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False, initial_state=None):
        if initial_state is not None:
            raise ValueError("the official kernel has no initial state input")
        return _OfficialScan.apply(module, u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    return scan
