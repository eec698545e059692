"""Import trained checkpoints from a directory, in the two layouts users have, and save this project's own.

Layouts (detected from config.json):
    state-spaces/mamba: config.json with ``d_model``, ``n_layer``, ``ssm_cfg`` ...; keys ``backbone.embedding.weight``,
        ``backbone.layers.N.mixer.*``, ``backbone.layers.N.norm.weight``, ``backbone.norm_f.weight``, ``lm_head.weight``.
        This is also the layout :func:`save_checkpoint` writes.
    transformers ``MambaForCausalLM``: config.json with ``hidden_size``, ``num_hidden_layers`` ...; the same keys but
        ``backbone.embeddings.weight``.
Weights: ``model.safetensors`` (or sharded, with ``model.safetensors.index.json``), or ``pytorch_model.bin`` (or
sharded, with its index), float32, float16 or bfloat16. ``.bin`` files are read with ``weights_only=True``: no pickled
code runs. Validation is strict: every problem is one :class:`CheckpointError` naming the file, the key, the expected
and the found value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import MambaConfig
from .errors import CheckpointError, ConfigError
from .model import MambaLM
from .outdir import output_path, write_dir

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "byte_vocab.json")


def read_config(ckpt_dir: str | os.PathLike) -> tuple[MambaConfig, str, dict]:
    """Read ``ckpt_dir/config.json``. Returns the resolved config, the layout name and the raw dictionary."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise CheckpointError(f"{d}: checkpoint directory does not exist")
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (give the checkpoint directory)")
    path = d / "config.json"
    if not path.is_file():
        what = "not a regular file" if path.exists() else "missing"
        raise CheckpointError(f"{path}: {what} (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except OSError as e:  # unreadable: permissions, an I/O error
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    model_type = raw.get("model_type")
    try:
        if model_type not in (None, "mamba"):
            raise CheckpointError(f"{path}: model_type {model_type!r} is not a Mamba-1 model (expected 'mamba')")
        if "d_model" in raw:
            return MambaConfig.from_state_spaces(raw), "state-spaces", raw
        if "hidden_size" in raw or model_type == "mamba":
            return MambaConfig.from_transformers(raw), "transformers", raw
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad value ({e})") from None
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (expected state-spaces/mamba keys such as 'd_model' "
        "or transformers MambaConfig keys such as 'hidden_size')"
    )


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is not a usable checkpoint
        # torch's text suggests weights_only=False: never for a checkpoint. A file that is a pickle (or torch's zip
        # of one) holds objects the weights-only unpickler refuses; other bytes (a damaged or random file) are no
        # pickle at all and get the plain message below
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        if "Weights only load failed" in str(e) and (found or _looks_pickled(path)):
            raise CheckpointError(
                f"{path}: holds pickled Python objects besides tensors, which are not loaded (they could run code)"
                + (f": {found}" if found else "") + "; save the weights as a plain state dict or as safetensors"
            ) from None
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        if path.suffix != ".safetensors" and ("Weights only load failed" in str(e) or isinstance(e, EOFError)):
            # not a pickle at all (random or cut bytes, an empty file, a Git LFS pointer): torch's own text would
            # suggest weights_only=False, which this tool never does
            raise CheckpointError(f"{path}: not a readable checkpoint file (not a torch.save file, or a damaged or "
                                  f"empty one{_lfs_hint(path)})") from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint file ({type(e).__name__}: {msg[:200]}"
                              f"{_lfs_hint(path)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dictionary of tensors)")
    return sd


def _head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of ``path`` (b"" where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _lfs_hint(path: Path) -> str:
    """"; it is a Git LFS pointer ..." where ``path`` is one, else ""."""
    return "; it is a Git LFS pointer: fetch the file (git lfs pull)" if _head(path, 40).startswith(
        b"version https://git-lfs") else ""


def _looks_pickled(path: Path) -> bool:
    """Whether ``path`` starts as a pickle of protocol 2 to 5 or a zip archive (torch.save's format) does."""
    head = _head(path, 2)
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _load_weights(d: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """All tensors of the checkpoint, each with the file it came from."""
    for name in WEIGHT_FILES:
        path = d / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(s, str) and s for s in weight_map.values()):
                raise CheckpointError(f"{path}: not a valid shard index ('weight_map' must map each tensor name to "
                                      "the file name of its shard)")
            if bad := next((s for s in weight_map.values() if Path(s).name != s or s in (".", "..")), None):
                raise CheckpointError(f"{path}: shard {bad!r} is not a file name inside the checkpoint directory")
            shards = sorted(set(weight_map.values()))
            files = [d / s for s in shards]
        else:
            weight_map, files = None, [path]
        out: dict[str, tuple[torch.Tensor, Path]] = {}
        for f in files:
            for k, v in _load_file(f).items():
                if k in out:  # the later copy would win silently
                    raise CheckpointError(f"{f}: holds {k!r}, which {out[k][1].name} holds too")
                if weight_map is not None and weight_map.get(k) != f.name:
                    where = f"in {weight_map[k]}" if k in weight_map else "not listed"
                    raise CheckpointError(f"{f}: holds {k!r}, which {path.name} lists {where}")
                out[k] = (v, f)
        if weight_map is not None and (missing := sorted(set(weight_map) - set(out))):
            raise CheckpointError(f"{path}: lists {missing[0]!r} in {weight_map[missing[0]]}, which does not hold it"
                                  + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
        return out
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


_HF_EMBEDDING, _EMBEDDING = "backbone.embeddings.weight", "backbone.embedding.weight"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _rename(key: str, layout: str) -> str:
    """The model's name for a checkpoint key (transformers names the embedding ``embeddings``)."""
    return _EMBEDDING if layout == "transformers" and key == _HF_EMBEDDING else key


def _source_name(key: str, layout: str) -> str:
    """The checkpoint's name for a model key, for messages (the inverse of :func:`_rename`)."""
    return _HF_EMBEDDING if layout == "transformers" and key == _EMBEDDING else key


def _check_layer_count(cfg: MambaConfig, layout: str, tensors: dict, d: Path) -> None:
    """The weights' layer indices against config.json's layer count, before a model of that many layers is built."""
    layers: dict[int, tuple] = {}
    for key, entry in tensors.items():
        parts = key.split(".")
        if key.startswith("backbone.layers.") and len(parts) > 3 and parts[2].isdigit():
            layers.setdefault(int(parts[2]), entry)
    name = "num_hidden_layers" if layout == "transformers" else "n_layer"
    extra = [i for i in layers if i >= cfg.n_layer]
    if extra:
        _, f, key = layers[max(extra)]
        raise CheckpointError(f"{f}: unexpected key {key!r} (config.json's {name} is {cfg.n_layer})")
    if len(layers) < cfg.n_layer:
        first = next(i for i in range(cfg.n_layer) if i not in layers)  # at most len(layers) + 1 tries
        where = next(iter(tensors.values()))[1] if tensors else d
        raise CheckpointError(f"{where}: missing every key of layer {first} ('backbone.layers.{first}.*'; "
                              f"config.json's {name} is {cfg.n_layer}, the weights hold {len(layers)} layers)")


def load_checkpoint(
    ckpt_dir: str | os.PathLike, dtype: torch.dtype | None = None, backend: str = "reference"
) -> MambaLM:
    """Import the checkpoint in ``ckpt_dir`` (either layout) as a :class:`MambaLM` in eval mode.

    Args:
        ckpt_dir: the checkpoint directory.
        dtype: the model's parameter dtype; None keeps the dtype the embedding was stored in.
        backend: the operator backend of the model (see :class:`MambaLM`).

    Raises:
        CheckpointError: one line naming the file, the key, the expected and the found value.
    """
    d = Path(ckpt_dir)
    cfg, layout, _ = read_config(d)
    tensors = {_rename(k, layout): (v, f, k) for k, (v, f) in _load_weights(d).items()}  # the file's own key kept
    _check_layer_count(cfg, layout, tensors, d)
    if cfg.tie_embeddings and _EMBEDDING not in tensors and "lm_head.weight" in tensors:
        tensors[_EMBEDDING] = tensors["lm_head.weight"]  # a tied model saved under its head's name (transformers)
    with torch.device("meta"):
        model = MambaLM(cfg, backend=backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for key, (t, f, name) in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{f}: unexpected key {name!r} (not part of a Mamba-1 model with this config)")
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(
                f"{f}: key {name!r} has shape {list(t.shape)}, expected {list(expected[key])} from config.json"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{f}: key {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; supported: "
                                  "float32, float16, bfloat16, float64")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{f}: key {name!r} holds NaN or infinite values")
    for key in expected:
        if key not in tensors and key not in optional:
            first = next(iter(tensors.values()))[1] if tensors else d
            raise CheckpointError(f"{first}: missing key {_source_name(key, layout)!r} "
                                  f"(expected shape {list(expected[key])})")
    emb = tensors[_EMBEDDING][0]
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        head, f, _ = tensors["lm_head.weight"]
        if not torch.equal(head, emb):
            raise CheckpointError(
                f"{f}: key 'lm_head.weight' differs from the embedding, but config.json ties them "
                "(set tie_embeddings / tie_word_embeddings to false)"
            )
    dtype = dtype or emb.dtype
    sd = {k: t.to(dtype) for k, (t, _, _) in tensors.items() if not (k in optional and cfg.tie_embeddings)}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    model.set_backend(backend)
    return model.eval()


def _default_permissions(directory: Path) -> None:
    """Give ``directory`` and its files the modes a plain mkdir/open would (mkdtemp and safetensors use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def save_checkpoint(model: MambaLM, out_dir: str | os.PathLike, fmt: str = "safetensors",
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``model`` in the state-spaces/mamba layout (this project's own), atomically.

    Args:
        model: the model to save.
        out_dir: the directory to create or replace.
        fmt: "safetensors" (model.safetensors) or "bin" (pytorch_model.bin).
        extra_files: more files to write beside the weights (e.g. a tokenizer), name -> content.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    out = output_path(out_dir, CheckpointError)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_state_spaces(), indent=2) + "\n")
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            if model.config.tie_embeddings:
                sd.pop("lm_head.weight")
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(sd, tmp / "pytorch_model.bin")
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
        _default_permissions(tmp)

    write_dir(out, fill, "the checkpoint", CheckpointError)  # a full disk: one line, the old checkpoint kept
    return out


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint directory: a config.json and weights or a training state."""
    return (path / "config.json").is_file() and any((path / name).is_file()
                                                     for name in (*WEIGHT_FILES, "train_state.pt"))
