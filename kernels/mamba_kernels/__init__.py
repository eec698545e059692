"""mamba_kernels: Triton kernels for Mamba-1 (selective scan forward/backward, causal conv, decode step, the blocks'
residual add + RMSNorm).

Each op is a ``torch.library`` custom op (``mamba_kernels::*``) with a fake implementation, so torch.compile and
torch.export see one op rather than a graph break; the sequence ops are differentiable in every tensor input.
:data:`BACKEND` is the ``"triton"`` backend of :mod:`mamba_export.backends`: the five functions have exactly the
signatures, layouts and return values of the references in :mod:`mamba_export.ops`.

Triton runs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (set before this package is imported).
"""

from mamba_export.backends import Backend

from ._checks import KernelInputError
from .causal_conv1d import causal_conv1d, causal_conv1d_step
from .rms_norm import add_rms_norm
from .selective_scan import selective_scan
from .selective_state_update import selective_state_update

__all__ = [
    "BACKEND", "KernelInputError", "add_rms_norm", "causal_conv1d", "causal_conv1d_step", "selective_scan",
    "selective_state_update",
]

BACKEND = Backend(
    name="triton",
    selective_scan=selective_scan,
    causal_conv1d=causal_conv1d,
    causal_conv1d_step=causal_conv1d_step,
    selective_state_update=selective_state_update,
    add_rms_norm=add_rms_norm,
)
