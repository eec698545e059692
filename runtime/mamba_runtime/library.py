"""Where the custom-op library is, for Python users (C++ users: see docs/cpp_runtime.md)."""

from __future__ import annotations

import os
from pathlib import Path

from mamba_export.errors import MambaExportError

LIBRARY_NAME = "libmamba_export_ops.so"
ENV_VAR = "MAMBA_EXPORT_OPS_LIBRARY"


def env_library() -> Path | None:
    """The file ``$MAMBA_EXPORT_OPS_LIBRARY`` names, or None when it is unset or empty.

    Raises:
        MambaExportError: the variable names no file (a typo must not silently test the default library instead).
    """
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise MambaExportError(f"{ENV_VAR} is set to {value!r}, which {what}; point it at a built {LIBRARY_NAME} "
                               "or unset it to use the default one")
    return path


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = []
    if (path := env_library()) is not None:
        found.append(path)
    found.append(here / "lib" / LIBRARY_NAME)  # installed by tools/build_custom_ops.sh
    found.append(here.parents[1] / "custom_ops" / "build" / LIBRARY_NAME)  # a source checkout's build folder
    return found


def custom_op_library_path() -> str:
    """Absolute path of the built custom-op library (``$MAMBA_EXPORT_OPS_LIBRARY`` first, when set).

    Register it with ``onnxruntime.SessionOptions().register_custom_ops_library(path)``.

    Raises:
        MambaExportError: the library has not been built (run ``bash tools/build_custom_ops.sh``), or
            ``$MAMBA_EXPORT_OPS_LIBRARY`` is set and names no file.
    """
    candidates = _candidates()
    for path in candidates:
        if path.is_file():
            return str(path)
    checkout = (Path(__file__).resolve().parents[2] / "tools" / "build_custom_ops.sh").is_file()
    how = ("build it with: bash tools/build_custom_ops.sh" if checkout else
           f"this installed package has none: build it in a clone of the repository (bash tools/build_custom_ops.sh) "
           f"and set {ENV_VAR} to it, or use an export directory that ships its own copy (the default export does)")
    raise MambaExportError(
        f"custom-op library {LIBRARY_NAME} not found (looked in {', '.join(map(str, candidates))}); {how}"
    )
