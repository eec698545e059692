"""Where the custom-op library is, for Python users (C++ users: see docs/cpp_runtime.md)."""

from __future__ import annotations

import os
from pathlib import Path

from mamba_export.errors import MambaExportError

LIBRARY_NAME = "libmamba_export_ops.so"
ENV_VAR = "MAMBA_EXPORT_OPS_LIBRARY"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = []
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]))
    found.append(here / "lib" / LIBRARY_NAME)  # installed by tools/build_custom_ops.sh
    found.append(here.parents[1] / "custom_ops" / "build" / LIBRARY_NAME)  # a source checkout's build folder
    return found


def custom_op_library_path() -> str:
    """Absolute path of the built custom-op library (``$MAMBA_EXPORT_OPS_LIBRARY`` first, when set).

    Register it with ``onnxruntime.SessionOptions().register_custom_ops_library(path)``.

    Raises:
        MambaExportError: the library has not been built (run ``bash tools/build_custom_ops.sh``).
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
