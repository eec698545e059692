"""Stop strings: a sequence ends as soon as its generated text contains one of them.

The text is the incremental decoding of the generated tokens (the prompt is not searched), so a stop string is found
however the tokenizer splits it over tokens; the token that completes it is the last one generated, and the text is
cut where the earliest match starts. :class:`StopText` also says which part of the text can be shown while the
sequence runs: everything but the longest end of it that could still grow into a stop string.
"""

from __future__ import annotations

from .errors import GenerationInputError


def check_stop_strings(stop_strings) -> tuple[str, ...]:
    """``stop_strings`` (one string or a collection of them) as a tuple of non-empty strings, else a one-line
    GenerationInputError."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if isinstance(stop_strings, (bytes, bytearray, memoryview)):
        raise GenerationInputError("stop strings must be text (str), not bytes")
    try:
        items = tuple(stop_strings)
    except TypeError:
        raise GenerationInputError(f"stop strings must be a string or a list of strings, not "
                                   f"{type(stop_strings).__name__}") from None
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise GenerationInputError(f"stop strings must be strings, found {type(s).__name__} (item {i})")
        if not s:
            raise GenerationInputError(f"stop strings must not be empty: an empty one would stop at once (item {i})")
        if bad := next((c for c in s if 0xD800 <= ord(c) <= 0xDFFF), None):
            # what Python makes of bytes that are not UTF-8 (surrogateescape): the generated text holds U+FFFD there
            raise GenerationInputError(
                f"stop strings must be Unicode text: item {i} has a lone surrogate (U+{ord(bad):04X}), as bytes that "
                "are not UTF-8 become; the generated text shows such bytes as U+FFFD, so use stop tokens for them")
    return tuple(dict.fromkeys(items))  # in order, without repeats


class StopText:
    """One sequence's generated text, watched for stop strings.

    ``push(token)`` decodes the token and returns True when the text now contains a stop string (``cut`` is then
    where the first match starts, in characters); ``text()`` is the text before it. For streaming, ``take()``
    returns the text that became safe to show (held back: the end that could be the start of a stop string; after
    a match, the rest up to the cut) and ``finish()`` whatever is left once the sequence has ended without a match.
    Work per token is bounded by the stop strings' lengths, not the text's.
    """

    def __init__(self, stream, stop_strings: tuple[str, ...]):
        self._stream = stream  # the codec's incremental decoder
        self.strings = stop_strings
        self._keep = max(map(len, stop_strings), default=1) - 1  # a match can start this far back from the end
        self._pieces: list[str] = []
        self._total = 0  # characters decoded so far
        self._tail = ""  # their last _keep characters
        self._unsent = ""  # characters not yet returned by take()
        self.cut: int | None = None

    def push(self, token: int) -> bool:
        if self.cut is not None:
            return True
        piece = self._stream.push(token)
        if not piece:
            return False
        window = self._tail + piece  # no match lies wholly in _tail: it would have been found a token earlier
        starts = [i for s in self.strings if (i := window.find(s)) >= 0]
        if starts:
            self.cut = self._total - len(self._tail) + min(starts)
        self._pieces.append(piece)
        self._total += len(piece)
        self._unsent += piece
        self._tail = window[-self._keep:] if self._keep else ""
        return self.cut is not None

    def text(self) -> str:
        """The text decoded so far, cut before the matched stop string."""
        text = "".join(self._pieces)
        return text if self.cut is None else text[:self.cut]

    def take(self) -> str:
        """Text that can be shown now, and not again."""
        if self.cut is not None:
            n = max(0, len(self._unsent) - (self._total - self.cut))
        else:
            n = len(self._unsent) - self._held()
        out, self._unsent = self._unsent[:n], self._unsent[n:]
        return out

    def finish(self) -> str:
        """The rest, once the sequence has ended: nothing more after a match; else everything still held back and
        the decoder's last characters."""
        if self.cut is not None:
            return self.take()
        out, self._unsent = self._unsent + self._stream.flush(), ""
        return out

    def _held(self) -> int:
        """The length of the longest end of the unsent text that is the start of a stop string."""
        tail = self._unsent[-self._keep:] if self._keep else ""
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.strings):
                return k
        return 0
