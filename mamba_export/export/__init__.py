"""Export a Mamba model to an ONNX (or TorchScript) export directory; see :mod:`.api` and docs/export.md."""

from .api import export_checkpoint, export_model
from .directory import ExportError

__all__ = ["ExportError", "export_checkpoint", "export_model"]
