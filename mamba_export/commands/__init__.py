"""Subcommands of the ``mamba-export`` CLI, one module each (see :mod:`mamba_export.cli`)."""
