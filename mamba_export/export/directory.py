"""Writing an export directory atomically, and the files beside the graphs: manifest.json, genai_config.json,
the custom-op library and the tokenizer.

The directory is built in a hidden temporary directory beside OUT_DIR and renamed into place at the end, so a
failed export leaves nothing behind and a replaced export (``force``) is never half old, half new.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .. import outdir
from ..errors import MambaExportError

FORMAT_VERSION = 1


class ExportError(MambaExportError):
    """An export that cannot be written as asked: bad option, existing or unwritable output, missing library."""


def check_target(out: Path, force: bool, inputs: dict[str, Path] | None = None) -> None:
    """Fail early when ``out`` cannot be (re)placed: exists without ``force``, is a file, is not writable, or (with
    ``force``) is not empty and not an export directory, is or contains the current directory, or contains one of
    ``inputs`` (description -> path, e.g. the checkpoint being exported)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.exists():
        if not force:
            raise ExportError(f"{out}: already exists (use --force / force=True to replace it)")
        outdir.check_replace(out, "an export directory (no manifest.json written by mamba-export)", _is_export,
                             inputs or {}, ExportError)
    outdir.check_writable(out, ExportError)


def _is_export(path: Path) -> bool:
    """Whether ``path`` holds an export this tool wrote (a manifest.json with a format version)."""
    try:
        return "format_version" in json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def write_atomically(out_dir: str | os.PathLike, force: bool, build: Callable[[Path], None],
                     inputs: dict[str, Path] | None = None) -> Path:
    """Call ``build(tmp)`` to fill a fresh temporary directory, then rename it to ``out_dir``.

    Raises:
        ExportError: ``out_dir`` exists (and not ``force``), may not be replaced (:func:`check_target`) or cannot be
            written. Whatever ``build`` raises is re-raised after the temporary directory is removed; an existing
            ``out_dir`` is then left untouched.
    """
    out = outdir.output_path(out_dir, ExportError)
    check_target(out, force, inputs)

    def fill(tmp: Path) -> None:
        build(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp made it private; the export gets the usual permissions

    outdir.write_dir(out, fill, "the export", ExportError)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def library_path() -> Path:
    """The built custom-op library (see :func:`mamba_runtime.custom_op_library_path`), checked by registering it with
    onnxruntime. An export ships it as ``libmamba_export_ops.so`` whatever its file name here.

    Raises:
        ExportError: the library is not built (says how to build it, or to pass --no-library) or cannot be loaded.
    """
    from mamba_runtime import custom_op_library_path
    from mamba_runtime.sessions import session_options

    try:
        path = Path(custom_op_library_path())
        session_options(None, str(path))  # registers it: a damaged file or another ABI fails here, not in the export
    except MambaExportError as e:
        raise ExportError(f"{e} (or export without it: --no-library / with_library=False)") from None
    return path


def copy_tokenizer(ckpt_dir: Path | None, out: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the tokenizer files among ``names`` that ``ckpt_dir`` has; returns the names copied."""
    if ckpt_dir is None:
        return []
    copied = [n for n in names if (ckpt_dir / n).is_file()]
    for name in copied:
        shutil.copy2(ckpt_dir / name, out / name)
    return copied


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def file_checksums(out: Path) -> dict[str, dict]:
    """sha256 and size of every file in ``out`` (except manifest.json), by name."""
    return {
        p.name: {"sha256": outdir.sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
