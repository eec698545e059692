"""mamba-export: take a trained Mamba language model out of PyTorch and run it anywhere.

This top-level module imports nothing heavy (no torch): import the submodules you need, e.g.
``from mamba_export.model import MambaLM`` or ``from mamba_export.checkpoint import load_checkpoint``.
The torch-free runtime lives in the separate package :mod:`mamba_runtime`; the Triton kernels in :mod:`mamba_kernels`.
"""

__version__ = "0.1.0"
