"""Output directories that commands create or replace (export directories, training checkpoints): checks made before
any slow work, so that a mistake costs nothing, and the atomic replacement itself.

``--force`` replaces a directory only where that cannot destroy anything the user did not ask to lose: the directory
must be empty or look like what the command writes (an export: its manifest.json; a checkpoint: its config.json and
weights), must not be or contain the current directory, and must not contain the command's own inputs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import MambaExportError


def output_path(path: str | os.PathLike, error: type[MambaExportError] = MambaExportError) -> Path:
    """``path`` made absolute (and normalised); an empty name is an error rather than the current directory. A
    symbolic link is followed: the directory it points to is the one written or replaced (the link stays), and a
    link to nothing is an error now, before any slow work."""
    if not str(path).strip():
        raise error("the output directory name is empty")
    out = Path(os.path.abspath(os.fspath(path)))
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.exists():
            raise error(f"{out}: is a symbolic link to {target}, which does not exist")
        return target
    return out


def _within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies inside it (symlinks resolved)."""
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def check_replace(out: Path, kind: str, looks_like: Callable[[Path], bool], inputs: dict[str, Path],
                  error: type[MambaExportError] = MambaExportError) -> None:
    """Raise ``error`` unless the existing directory ``out`` may be replaced under ``--force``.

    Args:
        out: an existing directory (absolute).
        kind: what the command writes, for the message ("an export directory", "a checkpoint directory").
        looks_like: whether a non-empty directory is one the command wrote.
        inputs: the command's inputs by description ("the checkpoint", "--data"), which must not be inside ``out``.
    """
    try:
        cwd = Path.cwd()
    except OSError:  # the current directory was deleted: it cannot be inside out
        cwd = None
    if cwd is not None and _within(cwd, out):
        raise error(f"{out}: is the current directory or contains it; refusing to replace it (--force)")
    for what, path in inputs.items():
        if _within(Path(path).absolute(), out):
            raise error(f"{out}: contains {what} ({path}); refusing to replace it (--force)")
    if any(out.iterdir()) and not looks_like(out):
        raise error(f"{out}: exists and is not {kind}; refusing to replace it with --force (remove it yourself or "
                    f"choose another directory)")


def check_writable(out: Path, error: type[MambaExportError] = MambaExportError, inside: bool = False) -> None:
    """Raise ``error`` unless ``out`` can be created or replaced: a directory can be made in its nearest existing
    ancestor (checked before the slow work, not found out at the end). ``inside``: the files go into ``out`` itself,
    so where it is a directory already, the probe is made in it."""
    parent = out if inside and out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{out}: cannot write there ({parent} is not a directory)")
    try:  # a real probe: permission bits say nothing to root, nor about /proc or a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".mamba-export-probe-", dir=parent))
    except OSError as e:
        raise error(f"{out}: cannot write there (making a directory in {parent} failed: {e.strerror or e})") from None


def first_missing(path: Path) -> Path | None:
    """The outermost ancestor of ``path`` (or ``path`` itself) that does not exist yet: what making ``path`` with its
    parents creates, and what :func:`remove_created` takes away again after a failure."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def remove_created(top: Path | None) -> None:
    """Remove the directories a failed command made (``top``, from :func:`first_missing`) where they are empty."""
    if top is None or not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [top]:
        try:
            d.rmdir()
        except OSError:
            return


def os_error_text(e: OSError) -> str:
    """An OSError as a short phrase: its message and the file it is about."""
    return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


def write_dir(out: Path, build: Callable[[Path], None], what: str,
              error: type[MambaExportError] = MambaExportError) -> None:
    """Fill a fresh hidden directory beside ``out`` with ``build(tmp)``, then put it in place of ``out``
    (:func:`replace_dir`). On any failure the temporary directory and the parents this made are removed and an
    existing ``out`` is untouched; an OSError (a full disk, an unwritable place) becomes one ``error`` line about
    writing ``what``, anything else is re-raised."""
    created = first_missing(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        remove_created(created)
        raise error(f"{out}: cannot create ({os_error_text(e)})") from None
    try:
        build(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        if isinstance(e, OSError):
            raise error(f"{out}: cannot write {what} ({os_error_text(e)})") from None
        raise


def replace_dir(new: Path, out: Path) -> None:
    """Rename the finished directory ``new`` to ``out`` (same parent); an existing ``out`` is moved aside first and
    deleted only once ``new`` is in place, so ``out`` is never half old, half new, nor lost if the rename fails."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 4 MiB blocks (the manifest's checksums, a run's tokenizer)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()
