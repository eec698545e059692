"""Training text: reading it, turning it into token ids (bytes or a tokenizers ``tokenizer.json``), splitting off the
held-out part, and drawing training windows.

Byte-level models have vocab 256 and token id = byte value; their checkpoint carries ``byte_vocab.json``
(:data:`BYTE_VOCAB`), the marker the exporter and runtimes read. Tokenizer-based models carry a copy of the
``tokenizer.json`` they were trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ..errors import MambaExportError

BYTE_VOCAB = {"type": "bytes", "vocab_size": 256}
BYTE_VOCAB_FILE = "byte_vocab.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class Corpus:
    """A text as token ids, split into a training and a held-out part.

    Attributes:
        train: (n_train,) int64 ids, the first ``1 - eval_fraction`` of the text.
        heldout: (n_heldout,) int64 ids, the rest.
        heldout_bytes: UTF-8 bytes of the held-out text (for bits per byte).
        heldout_token_bytes: (n_heldout,) the UTF-8 bytes of the text each held-out token covers (from the
            tokenizer's character offsets: a character split over tokens counts with the last of them; None for a
            byte-level corpus, where every token is one byte), so that an evaluation divides its bits by the bytes
            of the tokens it scored.
        vocab_size: ids are in [0, vocab_size).
        sha256: of the text file, so that a resumed run can check it trains on the same text.
        tokenizer_files: name -> content of the tokenizer files to put beside the checkpoint.
        tokenizer_sha256: of the tokenizer.json file (its bytes, which the checkpoint copies as they are); None for
            a byte-level corpus. A resumed run checks it.
    """

    train: torch.Tensor
    heldout: torch.Tensor
    heldout_bytes: int
    vocab_size: int
    sha256: str
    tokenizer_files: dict[str, str | bytes]
    tokenizer_sha256: str | None = None
    heldout_token_bytes: torch.Tensor | None = None


def read_text(path: str | Path) -> bytes:
    """The bytes of the training text; one-line errors for a missing, unreadable or empty file."""
    p = Path(path)
    if p.is_dir():
        raise MambaExportError(f"{p}: is a directory, not a training text file")
    if not p.is_file():
        raise MambaExportError(f"{p}: training text not found")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MambaExportError(f"{p}: cannot read the training text ({e.strerror})") from None
    if not data.strip():
        raise MambaExportError(f"{p}: the training text is empty")
    return data


def _byte_ids(data: bytes) -> torch.Tensor:
    """Byte-level token ids: (n,) int64, id = byte value."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _tokenize(data: bytes, tokenizer_path: str, source: str):
    """Token ids (n,) int64 from a tokenizer.json, its vocabulary size, the file's bytes, and each token's first
    character."""
    from tokenizers import Tokenizer

    tp = Path(tokenizer_path)
    if not tp.is_file():
        raise MambaExportError(f"{tp}: tokenizer file not found")
    try:
        raw = tp.read_bytes()
    except OSError as e:
        raise MambaExportError(f"{tp}: cannot read the tokenizer ({e.strerror})") from None
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise MambaExportError(f"{tp}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MambaExportError(f"{source}: not UTF-8 text at byte {e.start}, which a tokenizer needs") from None
    enc = tok.encode(text, add_special_tokens=False)
    ids = torch.tensor(enc.ids, dtype=torch.long)
    return ids, tok.get_vocab_size(), raw, [start for start, _ in enc.offsets]


def load_corpus(path: str | Path, eval_fraction: float, min_tokens: int, tokenizer_path: str | None = None) -> Corpus:
    """Read and encode the text at ``path`` and hold out its last ``eval_fraction`` of tokens.

    ``min_tokens`` is the least either part may have (one window plus its target); a shorter text is an error.
    """
    data = read_text(path)
    if tokenizer_path is None:
        ids, vocab, files = _byte_ids(data), 256, {BYTE_VOCAB_FILE: json.dumps(BYTE_VOCAB) + "\n"}
        tok_sha = None
    else:
        ids, vocab, tok_json, char_starts = _tokenize(data, tokenizer_path, str(path))
        files, tok_sha = {TOKENIZER_FILE: tok_json}, hashlib.sha256(tok_json).hexdigest()
    n_heldout = int(len(ids) * eval_fraction)
    if n_heldout < min_tokens or len(ids) - n_heldout < min_tokens:
        raise MambaExportError(
            f"{path}: too short: {len(ids)} tokens, but the training and held-out parts need {min_tokens} each "
            f"(held out: the last {eval_fraction:.0%})"
        )
    if tokenizer_path is None:
        heldout_bytes, token_bytes = n_heldout, None
    else:
        text = data.decode("utf-8")
        starts = char_starts[-n_heldout:] + [len(text)]
        token_bytes = torch.tensor([len(text[a:b].encode("utf-8")) for a, b in zip(starts[:-1], starts[1:])])
        heldout_bytes = int(token_bytes.sum())
    return Corpus(ids[:-n_heldout], ids[-n_heldout:], heldout_bytes, vocab, hashlib.sha256(data).hexdigest(), files,
                  tok_sha, token_bytes)


def sample_batch(ids: torch.Tensor, batch: int, seq_len: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` windows at random offsets of ``ids``: inputs (batch, seq_len) and targets shifted by one."""
    starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=gen)
    windows = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
