"""User-facing errors of the runtime; all derive from :class:`mamba_export.errors.MambaExportError` (torch-free)."""

import numpy as np

from mamba_export.errors import MambaExportError

__all__ = ["MambaExportError", "ExportDirError", "GenerationInputError", "ModelOutputError", "SnapshotError"]


class ExportDirError(MambaExportError):
    """An export directory that cannot be run: missing, incomplete, corrupted or of another format version."""


class GenerationInputError(MambaExportError):
    """A request the model cannot run: empty prompt, token id out of range, batch over the limit, bad setting."""


class SnapshotError(MambaExportError):
    """A state snapshot that cannot be restored (unreadable, damaged, of another format or from another export) or
    written (``Generation.save`` to a path that cannot be written)."""


class ModelOutputError(MambaExportError):
    """The model produced logits that cannot be sampled from (NaN or infinity): damaged weights, as a rule."""


def is_int(value) -> bool:
    """An integer: a Python int or a numpy integer scalar, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number: a Python int or float or a numpy integer or float scalar, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def require_int(value, name: str, minimum: int = 1) -> int:
    """``int(value)`` if it is an integer (Python or numpy, not a bool) of at least ``minimum`` (1 or 0), else a
    GenerationInputError."""
    if not is_int(value) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise GenerationInputError(f"{name} must be {kind} integer, found {value!r}")
    return int(value)
