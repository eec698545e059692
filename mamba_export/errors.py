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


class Interrupted(Exception):
    """A command stopped early on a signal (Ctrl-C, SIGTERM) after leaving its work in a usable state. Not a
    :class:`MambaExportError`: the CLI prints its one-line message and exits with ``exit_status`` (128 + the
    signal's number: 130 for SIGINT, 143 for SIGTERM), not 2."""

    def __init__(self, message: str, exit_status: int = 130):
        super().__init__(message)
        self.exit_status = exit_status
