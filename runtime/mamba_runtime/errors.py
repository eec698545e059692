"""User-facing errors of the runtime; all derive from :class:`mamba_export.errors.MambaExportError` (torch-free)."""

from mamba_export.errors import MambaExportError

__all__ = ["MambaExportError", "ExportDirError", "GenerationInputError", "SnapshotError"]


class ExportDirError(MambaExportError):
    """An export directory that cannot be run: missing, incomplete, corrupted or of another format version."""


class GenerationInputError(MambaExportError):
    """A request the model cannot run: empty prompt, token id out of range, batch over the limit, bad setting."""


class SnapshotError(MambaExportError):
    """A state snapshot that cannot be restored: unreadable, of another format or from another export."""


def require_int(value, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum`` (1 or 0), else a GenerationInputError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise GenerationInputError(f"{name} must be {kind} integer, found {value!r}")
    return value
