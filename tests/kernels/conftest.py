"""Kernel tests: on a machine without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before ``triton.jit`` decorates the kernels (when mamba_kernels is first imported), so this
conftest sets it at import time, before any test module of this folder is collected.
"""

from __future__ import annotations

import os

import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _scan_along_axis(self, inputs):
    """Drop-in for the interpreter's generic ``tl.associative_scan``: same sequential order, but one combine call per
    step of the scanned axis over whole slices instead of one per element in Python (hundreds of times faster)."""
    datas = [np.ascontiguousarray(x.handle.data) for x in inputs]
    outs = [np.empty_like(d) for d in datas]
    acc = None
    for i in range(datas[0].shape[self.axis]):
        cur = [self.to_tensor(np.take(d, [i], axis=self.axis), x.dtype) for d, x in zip(datas, inputs)]
        if acc is not None:
            ret = self.combine_fn.fn(*acc, *cur)
            cur = list(ret) if isinstance(ret, tuple) else [ret]
        acc = cur
        for o, a in zip(outs, acc):
            idx = [slice(None)] * o.ndim
            idx[self.axis] = slice(i, i + 1)
            o[tuple(idx)] = a.handle.data
    return [self.to_tensor(o, x.dtype) for o, x in zip(outs, inputs)]


def _round_to_bfloat16(convert):
    """The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even, as torch does): round here too,
    so low-precision tests measure the kernels' arithmetic rather than the interpreter's casts."""

    def wrapped(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(data, np.float32)).to(torch.bfloat16).view(torch.int16) \
                .numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    return wrapped


if INTERPRET:
    import triton.language as tl
    from triton import __version__ as triton_version
    from triton.runtime import interpreter

    if not (hasattr(interpreter.ScanOps, "generic_scan") and hasattr(interpreter, "_convert_float")):
        raise RuntimeError(f"tests/kernels/conftest.py patches triton {triton_version}'s interpreter, whose internals "
                           "have changed: update _scan_along_axis / _round_to_bfloat16")
    interpreter.ScanOps.generic_scan = _scan_along_axis
    interpreter._convert_float = _round_to_bfloat16(interpreter._convert_float)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and INTERPRET:
            item.add_marker(skip)
