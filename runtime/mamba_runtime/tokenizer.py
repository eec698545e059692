"""Text in and out, when the export directory carries a tokenizer.

Two kinds are understood:
    ``tokenizer.json``  a Hugging Face tokenizers file (needs the ``tokenizers`` package: ``mamba-export[text]``);
    ``byte_vocab.json`` ``{"type": "bytes", "vocab_size": 256}``, this project's byte-level models: token id = byte
                        value of the UTF-8 text.
Without either the runtime works on token ids only.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import ExportDirError, GenerationInputError
from .manifest import parse_json


def _lone_surrogate(text: str) -> GenerationInputError:
    """The error for text that cannot be encoded: a lone surrogate (U+D800-U+DFFF) is no Unicode character."""
    i = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    return GenerationInputError(
        f"the prompt is not valid Unicode text: it has a lone surrogate (U+{ord(text[i]):04X}) at character {i}; "
        "pass token ids instead")


class ByteCodec:
    """UTF-8 bytes as tokens: id = byte value. Ids >= 256 (padding rows of the vocabulary) decode to U+FFFD."""

    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``. Python gives bytes that are not UTF-8 in a command line, an environment
        variable or a file name as the surrogates U+DC80-U+DCFF (surrogateescape); for a byte-level model those
        stand for exactly those bytes, so they encode back to them. Any other surrogate is refused."""
        try:
            return list(text.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            raise _lone_surrogate(text) from None

    def decode(self, ids: list[int]) -> str:
        return _ByteStream().push_all(ids)

    def stream(self) -> "_ByteStream":
        """An incremental decoder: ``push(id)`` returns the text completed by that token (maybe '')."""
        return _ByteStream()


class _ByteStream:
    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if token >= 256:
            return self._dec.decode(b"", final=True) + "\ufffd"
        return self._dec.decode(bytes([token]))

    def push_all(self, ids: list[int]) -> str:
        return "".join(self.push(t) for t in ids) + self.flush()

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class TokenizerUnavailable(ExportDirError):
    """The export has a tokenizer.json but the ``tokenizers`` package is not installed: token ids still work."""


class HFTokenizerCodec:
    """A Hugging Face ``tokenizer.json`` (special tokens are added on encode and skipped on decode, as its own
    post-processor and decoder say)."""

    kind = "tokenizer.json"

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerUnavailable(
                f"{path}: reading it needs the 'tokenizers' package (pip install 'mamba-export[text]'), "
                "or pass token ids instead of text"
            ) from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception for a bad file
            raise ExportDirError(f"{path}: not a valid tokenizer.json ({e})") from None

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")  # in C: only a lone surrogate fails
        except UnicodeEncodeError:
            raise _lone_surrogate(text) from None
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def stream(self) -> "_HFStream":
        return _HFStream(self._tok)


class _HFStream:
    """tokenizers' DecodeStream, made to give in all exactly ``decode`` of every token pushed: ``flush`` returns what
    DecodeStream still holds back at the end (it waits on text that ends in U+FFFD, a character cut between byte
    tokens, which the end of a generation leaves cut), and where DecodeStream fails (a decoder whose output for a
    prefix is no prefix of its output for more tokens, e.g. a Replace across tokens) the text comes from decoding
    every token so far, each push returning what that adds."""

    def __init__(self, tok):
        from tokenizers.decoders import DecodeStream

        self._tok, self._stream = tok, DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._pieces: list[str] = []  # what push has returned
        self._whole = False  # DecodeStream failed: decode every token so far instead

    def push(self, token: int) -> str:
        self._ids.append(token)
        if not self._whole:
            try:
                piece = self._stream.step(self._tok, token) or ""
            except Exception:  # the tokenizers library raises plain Exception ("Invalid prefix encountered ...")
                self._whole = True
        if self._whole:
            piece = self._rest()
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        return self._rest()

    def _rest(self) -> str:
        """decode(all tokens) past what was returned, when it still begins with that (else nothing: text already
        shown cannot be taken back)."""
        shown, whole = "".join(self._pieces), self._tok.decode(self._ids)
        return whole[len(shown):] if whole.startswith(shown) else ""


def load_codec(export_dir: Path) -> ByteCodec | HFTokenizerCodec | None:
    """The text codec of an export directory, or None when it has no tokenizer file."""
    if (export_dir / "tokenizer.json").is_file():
        return HFTokenizerCodec(export_dir / "tokenizer.json")
    path = export_dir / "byte_vocab.json"
    if path.is_file():
        try:
            spec = parse_json(path.read_bytes())
        except ValueError as e:
            raise ExportDirError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(spec, dict) or spec.get("type") != "bytes":
            raise ExportDirError(f"{path}: expected {{\"type\": \"bytes\", ...}}, found {spec!r}")
        return ByteCodec()
    return None


NO_TOKENIZER = "the export directory has neither tokenizer.json nor byte_vocab.json"


def require_codec(codec, what: str, unavailable: str | None = None):
    """``codec``, or a clear error saying that ``what`` needs a tokenizer (``unavailable``: why the export's own
    tokenizer could not be loaded)."""
    if codec is None and unavailable is not None:
        raise TokenizerUnavailable(f"{what}: {unavailable}")
    if codec is None:
        raise GenerationInputError(
            f"{what} needs a tokenizer, and {NO_TOKENIZER}; give token ids instead"
        )
    return codec
