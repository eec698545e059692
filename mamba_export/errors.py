"""Errors that users can cause and fix themselves.

Every error the CLI reports on one line derives from :class:`MambaExportError`; anything else is a bug and keeps its
traceback.
"""


class MambaExportError(Exception):
    """Base class for a user-facing error: its message is one line that says what is wrong and where."""


class CheckpointError(MambaExportError):
    """A checkpoint directory that cannot be imported: missing file, unknown layout, bad key, shape or file."""


class ConfigError(MambaExportError):
    """A model configuration that is inconsistent or uses a feature this project does not implement."""
