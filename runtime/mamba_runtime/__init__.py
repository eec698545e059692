"""mamba_runtime: run mamba-export export directories with onnxruntime, without torch.

Importing this package must never import torch (a test checks it).
"""

from .library import LIBRARY_NAME, custom_op_library_path

__all__ = ["LIBRARY_NAME", "custom_op_library_path"]
