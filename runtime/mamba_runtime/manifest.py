"""Opening an export directory: its manifest.json, checked against the files beside it (docs/CONTRACTS.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

from .errors import ExportDirError

SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
REQUIRED_GRAPHS = ("model.onnx", "decode.onnx")
# The graphs' external data. onnxruntime only reads numbers from these files, so their sha256 may be checked while the
# sessions load them (WeightCheck); every other file is checked before anything reads it.
WEIGHT_FILES = ("weights.bin", "decode_weights_f16.bin", "decode_weights_i8.bin")


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What the runtime needs to know about an export directory.

    Attributes:
        path: the directory.
        manifest: manifest.json as read.
        n_layer, d_inner, d_conv, d_state, vocab_size: the model's sizes (states: conv (b, d_inner, d_conv - 1) and
            ssm (b, d_inner, d_state) per layer, float32).
        dtype: the activation/logits dtype name ("float32", "float16", "bfloat16").
        prefill_graph: "model_last.onnx" when present (logits of the last position only), else "model.onnx".
        library: file name of the custom-op library in the directory, or None when the export ships none.
        export_id: a digest of the manifest's checksums: equal for the same export, also in another process.
    """

    path: Path
    manifest: dict
    n_layer: int
    d_inner: int
    d_conv: int
    d_state: int
    vocab_size: int
    dtype: str
    prefill_graph: str
    library: str | None
    export_id: str

    def state_shapes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of one layer's conv and ssm state for ``batch`` sequences."""
        return (batch, self.d_inner, self.d_conv - 1), (batch, self.d_inner, self.d_state)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# How deep JSON values may nest, as in the C++ runtime's reader (runtime/cpp/src/json.cpp, kMaxDepth)
MAX_JSON_DEPTH = 128


def json_type(value) -> str:
    """What a parsed JSON value is, as messages say it: "a string", "an array", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "a number")


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(data: str | bytes):
    """``json.loads(data)``, strict as the C++ runtime's reader: NaN and Infinity are not JSON, strings hold no
    surrogates (bytes are read as strict UTF-8, \\u escapes must pair), and values nest at most MAX_JSON_DEPTH deep
    (the top-level value is depth 0). Any failure is a ValueError of one line (a JSONDecodeError's position, bytes that
    are not text, or the nesting: json itself raises RecursionError for ``'[' * 100000``)."""
    try:
        # Bytes as strict UTF-8: json.loads(bytes) would let encoded surrogates (ED A0 80) through.
        value = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data,
                           parse_constant=_not_json)
    except RecursionError:
        raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    _check_parsed(value)
    return value


def _check_parsed(value) -> None:
    """One iterative walk over a parsed document: ValueError where a value sits deeper than MAX_JSON_DEPTH or a
    string (a key included) holds a lone surrogate, which a \\ud800 escape gives."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_JSON_DEPTH}")
        if isinstance(v, dict):
            strings = v.keys()
            stack.extend((c, depth + 1) for c in v.values())
        elif isinstance(v, list):
            strings = ()
            stack.extend((c, depth + 1) for c in v)
        else:
            strings = (v,) if isinstance(v, str) else ()
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds an unpaired surrogate (\\ud800-\\udfff escape)") from None


def _read_manifest(d: Path) -> dict:
    if not d.exists():
        raise ExportDirError(f"{d}: export directory does not exist")
    if not d.is_dir():
        raise ExportDirError(f"{d}: not a directory (give the directory written by 'mamba-export export')")
    path = d / MANIFEST
    if not path.is_file():
        raise ExportDirError(f"{path}: missing (is {d} an export directory written by 'mamba-export export'?)")
    try:
        manifest = parse_json(path.read_bytes())
    except ValueError as e:
        raise ExportDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ExportDirError(f"{path}: expected a JSON object, found {json_type(manifest)}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise ExportDirError(
            f"{path}: format_version {version!r:.60} is not supported by this runtime (supported: "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); re-export with this version of mamba-export"
        )
    if manifest.get("format", "onnx") != "onnx":
        raise ExportDirError(f"{path}: a {manifest.get('format')!r:.60} export; this runtime runs ONNX exports "
                             "(export with --format onnx)")
    return manifest


def _checksums(manifest: dict, path: Path) -> dict[str, str]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportDirError(f"{path}: 'files' must map each file name to its sha256")
    out = {}
    for name, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else entry
        if Path(name).name != name or name in ("", ".", ".."):
            raise ExportDirError(f"{path}: 'files' lists {name!r}, which is not a file name inside the export "
                                 "directory (the manifest was edited or is not from 'mamba-export export')")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ExportDirError(f"{path}: bad entry for file {name!r} in 'files': {entry!r}")
        out[name] = digest
    return out


def _verify_files(d: Path, checksums: dict[str, str], verify: bool, later: tuple[str, ...] = ()) -> None:
    for name in REQUIRED_GRAPHS:
        if name not in checksums:
            raise ExportDirError(f"{d / MANIFEST}: does not list {name}, which every export has")
    for name, digest in checksums.items():
        f = d / name
        if not f.is_file():
            what = "missing" if not f.exists() else "not a regular file"
            raise ExportDirError(f"{f}: {what} (listed in {MANIFEST}); the export directory is incomplete")
        if verify and name not in later:
            _check_digest(f, digest)


def _check_digest(f: Path, digest: str) -> None:
    try:
        ok = sha256_file(f) == digest
    except OSError as e:
        raise ExportDirError(f"{f}: cannot be read ({e.strerror or e})") from None
    if not ok:
        raise ExportDirError(f"{f}: sha256 does not match {MANIFEST} (file changed or corrupted); re-export it")


class WeightCheck:
    """The sha256 check of an export's weight files (:data:`WEIGHT_FILES`), in a thread, so that it overlaps
    onnxruntime loading them (a 3.3 GB export opened in 8.3 s instead of 12.5: BENCHMARKS.md section 7). Use it as a
    context manager around the session loads of an export opened with ``open_export_dir(..., weights_later=True)``:
    leaving the block waits for the check and raises its ExportDirError, in place of an exception from inside the
    block (a damaged weights.bin explains a failed load better than onnxruntime's message). Without ``verify`` it
    does nothing."""

    def __init__(self, info: ExportInfo, verify: bool):
        checksums = _checksums(info.manifest, info.path / MANIFEST)
        self._files = [(info.path / n, checksums[n]) for n in WEIGHT_FILES if verify and n in checksums]
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="mamba-weight-check", daemon=True)
        if self._files:
            self._thread.start()

    def _run(self) -> None:
        try:
            for f, digest in self._files:
                _check_digest(f, digest)
        except Exception as e:  # raised by wait() in the opening thread (MemoryError included, not lost here)
            self._error = e

    def wait(self) -> None:
        """Block until the check ends; ExportDirError if a file does not match the manifest."""
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> WeightCheck:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False  # KeyboardInterrupt, SystemExit: leave now, the daemon thread does not hold the process
        self.wait()
        return False


def _config_int(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportDirError(f"{path}: config.{key} must be a positive integer, found {value!r:.60}")
    if value > 2**31 - 1:
        raise ExportDirError(f"{path}: config.{key} is {value}, more than any model this runtime runs")
    return value


def open_export_dir(path: str | Path, verify: bool = True, *, weights_later: bool = False) -> ExportInfo:
    """Read and check ``path/manifest.json``: format version, every listed file present and (``verify``) its sha256.
    ``weights_later``: leave the sha256 of the weight files to a :class:`WeightCheck` run while they load.

    Raises:
        ExportDirError: one line naming the file and what is wrong.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ExportDirError(f"the export directory must be a path, not {type(path).__name__}")
    d = Path(os.path.abspath(path))  # absolute: the library's path must name a directory, or dlopen searches elsewhere
    manifest = _read_manifest(d)
    mpath = d / MANIFEST
    checksums = _checksums(manifest, mpath)
    _verify_files(d, checksums, verify, WEIGHT_FILES if weights_later else ())
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise ExportDirError(f"{mpath}: 'config' must be an object with the model's sizes")
    sizes = {k: _config_int(config, k, mpath) for k in ("n_layer", "d_inner", "d_conv", "d_state", "vocab_size")}
    if sizes["d_conv"] < 2:  # as MambaConfig and the C++ runtime
        raise ExportDirError(f"{mpath}: config.d_conv must be at least 2, found {sizes['d_conv']}")
    # The keys below are read as the C++ runtime reads them (runtime/cpp/src/manifest.cpp), so that the two runtimes
    # accept the same manifests.
    if "custom_op_library" not in manifest:
        raise ExportDirError(f"{mpath}: missing key 'custom_op_library' (null for an export without the library)")
    library = manifest["custom_op_library"]
    if library is not None and not isinstance(library, str):
        raise ExportDirError(f"{mpath}: custom_op_library must be a file name or null, found {json_type(library)}")
    if library is not None and library not in checksums:
        raise ExportDirError(f"{mpath}: custom_op_library {library!r} is not among the listed files")
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise ExportDirError(f"{mpath}: 'tokenizer' must be an object, found {json_type(tokenizer)}")
    if not isinstance(tokenizer.get("files"), list) or not all(isinstance(f, str) for f in tokenizer["files"]):
        raise ExportDirError(f"{mpath}: 'tokenizer.files' must be an array of file names")
    dtype = manifest.get("dtype", "float32")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ExportDirError(f"{mpath}: dtype {dtype!r:.60} is not one of float32, float16, bfloat16")
    digest = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:16]
    return ExportInfo(
        path=d, manifest=manifest, **sizes, dtype=dtype,
        prefill_graph="model_last.onnx" if "model_last.onnx" in checksums else "model.onnx",
        library=library, export_id=digest,
    )
