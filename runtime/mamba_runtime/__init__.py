"""mamba_runtime: run mamba-export export directories with onnxruntime, without torch.

Importing this package must never import torch (a test checks it). Start with :class:`MambaRuntime`.
"""

from .errors import ExportDirError, GenerationInputError, MambaExportError, ModelOutputError, SnapshotError
from .generation import Generation, GenerationResult
from .library import LIBRARY_NAME, custom_op_library_path
from .runtime import MambaRuntime
from .sampling import SamplingConfig
from .sessions import CpuPlacementWarning, CustomOpsFallbackWarning

__all__ = [
    "LIBRARY_NAME", "CpuPlacementWarning", "CustomOpsFallbackWarning", "ExportDirError", "Generation",
    "GenerationInputError", "GenerationResult", "MambaExportError", "MambaRuntime", "ModelOutputError",
    "SamplingConfig", "SnapshotError", "custom_op_library_path",
]
