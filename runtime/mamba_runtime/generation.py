"""A batch of sequences being generated, step by step, and its snapshots.

Shapes: b batch, V vocabulary, L n_layer, E d_inner, K d_conv, N d_state.

A :class:`Generation` holds, between steps, either the logits still to sample from (right after prefill) or the
tokens sampled last and not yet fed to the model ("pending"); the next :meth:`Generation.step` feeds them. So a
snapshot taken between any two steps (state, pending tokens or logits, tokens so far, generator states) restores to
exactly the same continuation, also in another process.

Sequences of a batch are prefilled without padding (prompts of equal length together, see
:meth:`MambaRuntime.prefill`) and decoded together. A sequence that
has finished (stop token or its token limit) keeps being fed a dummy token until the whole batch is done; its
outputs are dropped and it draws nothing from its generator, so the others are not affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import GenerationInputError, ModelOutputError, SnapshotError, is_int, is_real, require_int
from .manifest import parse_json
from .sampling import Sampler, SamplingConfig, token_logprobs
from .stopping import StopText
from .tokenizer import NO_TOKENIZER

SNAPSHOT_FORMAT = "mamba-runtime-snapshot"
SNAPSHOT_VERSION = 1


@dataclasses.dataclass
class GenerationResult:
    """Output of :meth:`MambaRuntime.generate`.

    Attributes:
        prompts: per sequence, the prompt's token ids.
        tokens: per sequence, the generated ids (ending with the stop token, or the token that completed the stop
            string, when one was hit).
        finish_reasons: per sequence "stop" (a stop token or stop string), "length" (max_new_tokens) or "cancelled"
            (callback or cancel()); "unfinished" for a sequence still running when result() is called
            mid-generation.
        texts: per sequence the decoded text without a final stop token, and cut before a matched stop string, when
            the export has a tokenizer.
        timings: prefill_ms, ttft_ms (prefill and the first token), decode_ms_per_step (median),
            decode_steps, total_ms (prefill and every step), tokens_per_s (tokens of all sequences / total_ms).
            Only work done in this process counts: for a restored generation prefill_ms and ttft_ms are None.
        seed: the seed the sequences drew from: ``SamplingConfig.seed``, or the one drawn for this generation when
            that is None; ``SamplingConfig(..., seed=result.seed)`` reproduces a sampled run. For greedy decoding
            (which draws nothing) the config's seed as given, usually None.
        logprobs: with ``logprobs=True``, per sequence the natural log of each generated token's probability under
            the model (the log softmax of the raw logits it was picked from: before the repetition penalty,
            temperature, top-k and top-p), one per token of ``tokens``; else None.
    """

    prompts: list[list[int]]
    tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None
    timings: dict
    seed: int | None = None
    logprobs: list[list[float]] | None = None


class Generation:
    """Sequences being generated. Make one with :meth:`MambaRuntime.start` or :meth:`MambaRuntime.restore`.

    Iterating yields the tokens of each step (b,) (-1 for sequences already finished) until all are finished.
    """

    def __init__(self, runtime, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 stop_tokens: frozenset[int], stop_strings: tuple[str, ...] = (), logprobs: bool = False,
                 history: list[list[int]] | None = None):
        self.runtime = runtime
        self.prompts = prompts
        # per sequence the tokens before its prompt (earlier turns of a conversation, see follow()): in the state
        # already, and seen by the repetition penalty
        self.history = history if history is not None else [[] for _ in prompts]
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_tokens = stop_tokens
        self.stop_strings = stop_strings
        # per sequence its generated text, watched for the stop strings (None without stop strings)
        self._stop_text: list[StopText | None] = [None] * len(prompts)
        if stop_strings:  # MambaRuntime._settings and _rebuild (a snapshot's) have checked that there is a codec
            self._stop_text = [StopText(runtime.codec.stream(), stop_strings) for _ in prompts]
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] | None = [[] for _ in prompts] if logprobs else None
        self.finish_reasons: list[str | None] = [None for _ in prompts]
        self.sampler = Sampler(sampling, len(prompts), runtime.info.vocab_size)
        for i, (h, p) in enumerate(zip(self.history, prompts, strict=True)):
            self.sampler.observe([i] * (len(h) + len(p)), h + p)
        self.state = runtime.new_state(len(prompts))
        self._logits: np.ndarray | None = None  # (b, V) to sample from, right after prefill
        self._pending: np.ndarray | None = None  # (b,) sampled, not yet fed
        self.prefill_s: float | None = None  # None until prefill() runs in this process (not for a restored one)
        self.first_token_s: float | None = None
        self.step_s: list[float] = []
        self._stepping = threading.Lock()  # held during step(): a second thread is refused, not let in

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def prefill(self) -> None:
        """Run every prompt from the start of a sequence and load the batch state."""
        t0 = time.perf_counter()
        self._logits, conv, ssm = self.runtime.prefill(self.prompts)
        self.state.upload(conv, ssm)
        self.prefill_s = time.perf_counter() - t0

    @contextlib.contextmanager
    def _claimed(self):
        """Hold the Generation for one call: a second thread is refused, not let in."""
        if not self._stepping.acquire(blocking=False):
            raise GenerationInputError("this Generation is being stepped by another thread: a Generation belongs to "
                                       "one thread at a time (the MambaRuntime may be shared; start one per request)")
        try:
            yield
        finally:
            self._stepping.release()

    def step(self) -> np.ndarray:
        """Generate one token per unfinished sequence: returns (b,) int64, -1 where a sequence had finished."""
        with self._claimed():
            return self._step()

    def _step(self) -> np.ndarray:
        if self.done:
            raise GenerationInputError("this generation is finished; start a new one")
        t0 = time.perf_counter()
        if self._pending is not None:
            logits = self.state.step(self._pending)
        else:
            logits = self._logits
        active = np.array([r is None for r in self.finish_reasons])
        try:
            _check_finite(logits, active, self.tokens)
        except ModelOutputError:
            self._pending, self._logits = None, np.array(logits)  # the tokens were fed: a next step fails the same
            raise
        new = self.sampler(logits, active)
        self._logits = None
        if self.logprobs is not None:
            rows = np.flatnonzero(active)
            for i, lp in zip(rows, token_logprobs(logits, rows, new[rows]).tolist()):
                self.logprobs[i].append(lp)
        self._record(new, active)
        self._pending = np.where(active, new, 0)
        elapsed = time.perf_counter() - t0
        if self.first_token_s is None and self.prefill_s is not None:
            self.first_token_s = self.prefill_s + elapsed
        else:
            self.step_s.append(elapsed)
        return new

    def _record(self, new: np.ndarray, active: np.ndarray) -> None:
        rows = np.flatnonzero(active)
        self.sampler.observe(rows, new[rows])
        for i in rows:
            t = int(new[i])
            self.tokens[i].append(t)
            if self._stops(i, t):
                self.finish_reasons[i] = "stop"
            elif len(self.tokens[i]) >= self.max_new_tokens:
                self.finish_reasons[i] = "length"

    def _stops(self, i: int, t: int) -> bool:
        """Whether token ``t``, just generated for sequence ``i``, ends it: a stop token, or the token that completes
        a stop string in its text (fed to the watcher). A stop token is no text: it is not shown and completes no
        stop string."""
        return t in self.stop_tokens or (self._stop_text[i] is not None and self._stop_text[i].push(t))

    def cancel(self, rows: Iterable[int] | None = None) -> None:
        """Finish the unfinished sequences ``rows`` (indices into the batch; all when None) now, reason "cancelled".
        The other rows go on; a cancelled row is fed a dummy token and draws nothing, as a finished one."""
        if rows is None:
            chosen = range(self.batch)
        else:
            chosen = [require_int(r, "row", minimum=0) for r in (rows if isinstance(rows, Iterable) else [rows])]
            if bad := [r for r in chosen if r >= self.batch]:
                raise GenerationInputError(f"row {bad[0]} is outside this batch of {self.batch} sequences")
        for r in chosen:
            self.finish_reasons[r] = self.finish_reasons[r] or "cancelled"

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self.done:
            yield self.step()

    def run(self, callback: Callable[[np.ndarray], bool | None] | None = None) -> GenerationResult:
        """Step until every sequence is finished, or until ``callback(new_tokens)`` returns True (then "cancelled")."""
        for new in self:
            if callback is not None and callback(new):
                self.cancel()
        return self.result()

    def result(self) -> GenerationResult:
        """The tokens so far, texts and timings (total: prefill and steps run in this process, not idle time)."""
        total_s = (self.first_token_s or 0.0) + sum(self.step_s)
        texts = None
        if self.runtime.codec is not None:
            texts = [w.text() if w is not None and w.cut is not None else
                     self.runtime.codec.decode(t[:-1] if r == "stop" else t)
                     for t, r, w in zip(self.tokens, self.finish_reasons, self._stop_text)]
        n = sum(map(len, self.tokens))
        timings = {
            "prefill_ms": None if self.prefill_s is None else self.prefill_s * 1e3,
            "ttft_ms": None if self.first_token_s is None else self.first_token_s * 1e3,
            "decode_ms_per_step": statistics.median(self.step_s) * 1e3 if self.step_s else None,
            "decode_steps": len(self.step_s),
            "total_ms": total_s * 1e3,
            "tokens_per_s": n / total_s if total_s > 0 else None,
        }
        reasons = [r or "unfinished" for r in self.finish_reasons]
        seed = self.sampling.seed if self.sampling.greedy else self.sampler.seed
        logprobs = None if self.logprobs is None else [list(x) for x in self.logprobs]
        return GenerationResult([list(p) for p in self.prompts], [list(t) for t in self.tokens], reasons, texts,
                                timings, seed, logprobs)

    def follow(self, prompt, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_tokens: Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
               logprobs: bool | None = None) -> Generation:
        """The next turn of this finished conversation: a new :class:`Generation` of one sequence that goes on from
        where this one ended (its prompt and every generated token, a final stop token included) with ``prompt``
        (text or ids: the user's next message) after it, without running the history again. Its tokens are those of
        ``runtime.start(history + prompt, ...)`` with the same settings (the repetition penalty counts the history
        too); its result's ``prompts`` holds the new prompt only. ``sampling``, ``stop_tokens``, ``stop_strings`` and
        ``logprobs`` default to this generation's (stop strings are searched in the new turn's text only). Works on
        a restored snapshot as well. One sequence only: a conversation is one sequence (in a batch, a row that
        finished early has been fed dummy tokens since)."""
        if self.batch != 1:
            raise GenerationInputError(f"follow() continues one sequence; this generation has {self.batch} (start "
                                       "one generation per conversation)")
        if not self.done:
            raise GenerationInputError("follow() continues a finished generation: run() it (or cancel()) first")
        runtime = self.runtime
        max_new_tokens, sampling, stops, strings, logprobs = runtime._settings(
            max_new_tokens, self.sampling if sampling is None else sampling,
            self.stop_tokens if stop_tokens is None else stop_tokens,
            self.stop_strings if stop_strings is None else stop_strings,
            self.logprobs is not None if logprobs is None else logprobs)
        new = runtime._prompts(prompt)
        if len(new) != 1:
            raise GenerationInputError(f"follow() takes one prompt, found {len(new)}")
        with self._claimed():
            history = [self.history[0] + self.prompts[0] + self.tokens[0]]  # every earlier turn
            gen = Generation(runtime, new, max_new_tokens, sampling, stops, strings, logprobs, history)
            unfed = [] if self._pending is None else [int(self._pending[0])]  # the last token, sampled, not yet run
            t0 = time.perf_counter()
            gen._logits, conv, ssm = runtime.prefill([unfed + new[0]], start=self.state.download())
            gen.state.upload(conv, ssm)
            gen.prefill_s = time.perf_counter() - t0
        return gen

    # ---- snapshots --------------------------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """Everything needed to continue exactly from here, as bytes (an .npz archive with a JSON header)."""
        conv, ssm = self.state.download()
        meta = {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "export_id": self.runtime.info.export_id,
            "prompts": self.prompts, "tokens": self.tokens, "finish_reasons": self.finish_reasons,
            "max_new_tokens": self.max_new_tokens, "stop_tokens": sorted(self.stop_tokens),
            "stop_strings": list(self.stop_strings), "logprobs": self.logprobs, "history": self.history,
            # a greedy run keeps its config's seed as given (usually None: it draws nothing), as result() reports it
            "sampling": {**self.sampling.to_dict(), "seed": self.sampling.seed if self.sampling.greedy
                         else self.sampler.seed}, "rng": self.sampler.rng_states(),
        }
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), "conv": conv, "ssm": ssm}
        if self._pending is not None:
            arrays["pending"] = self._pending
        else:
            arrays["logits"] = self._logits
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | Path) -> None:
        """Write :meth:`snapshot` to ``path``, whole or not at all (a file beside it, then renamed over it); a path
        that cannot be written is a :class:`SnapshotError`."""
        path = Path(path)
        data = self.snapshot()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise SnapshotError(f"{path}: cannot write the snapshot ({e.strerror or e})") from None


def _check_finite(logits: np.ndarray, active: np.ndarray, tokens: list[list[int]]) -> None:
    """ModelOutputError when a row about to be sampled has a NaN or infinite logit (as the C++ runtime refuses)."""
    rows = logits if active.all() else logits[active]
    if not np.isfinite(rows).all():
        i = int(np.flatnonzero(active)[np.flatnonzero(~np.isfinite(rows).all(axis=-1))[0]])
        raise ModelOutputError(
            f"the model produced non-finite logits (NaN or infinity) for new token {len(tokens[i]) + 1} of sequence "
            f"{i}; its weights may be damaged: open the export with the sha256 check on (without --no-verify or "
            "verify=False), or re-export it")


def load_snapshot(runtime, data: bytes) -> Generation:
    """Inverse of :meth:`Generation.snapshot` for ``runtime`` (the same export)."""
    if not data.startswith(b"PK"):
        raise SnapshotError("not a snapshot (Generation.snapshot writes a zip archive; these bytes are not one)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = arrays["meta"].tobytes()
    except Exception as e:  # zipfile and numpy each raise their own types for a damaged archive
        raise SnapshotError(f"not a readable snapshot ({type(e).__name__}: {e})") from None
    try:
        meta = parse_json(header)
    except ValueError as e:
        raise SnapshotError(f"not a readable snapshot (its header is not valid JSON: {e})") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"not a readable snapshot (its header is a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"not a {SNAPSHOT_FORMAT} version {SNAPSHOT_VERSION} (found {meta.get('format')!r} "
                            f"version {meta.get('version')!r})")
    if meta.get("export_id") != runtime.info.export_id:
        raise SnapshotError(f"snapshot was taken with another export (id {meta.get('export_id')}, this one is "
                            f"{runtime.info.export_id})")
    try:
        gen = _rebuild(runtime, meta)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as e:
        raise SnapshotError(f"snapshot metadata is incomplete or malformed ({type(e).__name__}: {str(e):.200})") \
            from None
    _check_arrays(arrays, runtime.info, gen.batch)
    gen.state.upload(arrays["conv"], arrays["ssm"])
    gen._pending, gen._logits = arrays.get("pending"), arrays.get("logits")
    return gen


def _check_arrays(arrays: dict, info, batch: int) -> None:
    """The state (finite floats of the export's shapes) and either the pending ids (in the vocabulary) or the logits
    (finite), as :meth:`Generation.snapshot` writes them; else a SnapshotError."""
    conv_shape, ssm_shape = info.state_shapes(batch)
    for name, shape in (("conv", conv_shape), ("ssm", ssm_shape)):
        if arrays.get(name) is None or arrays[name].shape != (info.n_layer, *shape):
            raise SnapshotError(f"snapshot {name} state has shape {getattr(arrays.get(name), 'shape', None)}, "
                                f"expected {(info.n_layer, *shape)}")
        if arrays[name].dtype.kind != "f":
            raise SnapshotError(f"snapshot {name} state is {arrays[name].dtype}, expected floating-point numbers")
        if not np.isfinite(arrays[name]).all():
            raise SnapshotError(f"snapshot {name} state holds NaN or infinity; the snapshot is damaged")
    pending, logits = arrays.get("pending"), arrays.get("logits")
    if (pending is None) == (logits is None):
        raise SnapshotError("snapshot must hold either the pending tokens or the logits to sample from (found "
                            f"{'both' if pending is not None else 'neither'})")
    v = info.vocab_size
    if pending is not None:
        if pending.shape != (batch,) or pending.dtype.kind not in "iu":
            raise SnapshotError(f"snapshot pending tokens are {pending.dtype} {pending.shape}, expected integer "
                                f"({batch},)")
        if pending.size and not (pending.min() >= 0 and pending.max() < v):
            bad = int(pending[(pending < 0) | (pending >= v)][0])
            raise SnapshotError(f"snapshot pending token id {bad} is outside the vocabulary [0, {v})")
    else:
        if logits.shape != (batch, v) or logits.dtype.kind != "f":
            raise SnapshotError(f"snapshot logits are {logits.dtype} {logits.shape}, expected floats ({batch}, {v})")
        if not np.isfinite(logits).all():
            raise SnapshotError("snapshot logits hold NaN or infinity; the snapshot is damaged")


MAX_NEW_TOKENS = 2**31 - 1  # as the C++ runtime (an int); far beyond any real request
_FINISH_REASONS = (None, "stop", "length", "cancelled")


def _id_list(value, what: str, vocab: int) -> list[int]:
    """``value`` as a list of token ids in [0, vocab), else a SnapshotError naming ``what``."""
    if not isinstance(value, list) or not all(is_int(t) and 0 <= t < vocab for t in value):
        raise SnapshotError(f"snapshot {what} must be a list of token ids in [0, {vocab})")
    return [int(t) for t in value]


def _checked_meta(meta: dict, vocab: int) -> dict:
    """The snapshot header's prompts, tokens, finish reasons, stop tokens and max_new_tokens, checked to be of the
    types and ranges Generation.snapshot writes (a damaged header is a SnapshotError here, not an exception of another
    kind in a later step)."""
    prompts = meta["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise SnapshotError("snapshot prompts must be a non-empty list of prompts")
    prompts = [_id_list(p, "prompts", vocab) for p in prompts]
    if not all(prompts):
        raise SnapshotError("snapshot prompts must not be empty")
    b = len(prompts)
    limit = meta["max_new_tokens"]
    if not is_int(limit) or not 1 <= limit <= MAX_NEW_TOKENS:
        raise SnapshotError(f"snapshot max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], found {limit!r:.60}")
    tokens, reasons = meta["tokens"], meta["finish_reasons"]
    if not isinstance(tokens, list) or len(tokens) != b:
        raise SnapshotError(f"snapshot tokens must be a list of {b} token lists (one per prompt)")
    tokens = [_id_list(t, "tokens", vocab) for t in tokens]
    if any(len(t) > limit for t in tokens):
        raise SnapshotError("snapshot tokens run past its max_new_tokens")
    if not isinstance(reasons, list) or len(reasons) != b or not all(r in _FINISH_REASONS for r in reasons):
        raise SnapshotError(f"snapshot finish_reasons must be {b} of null, \"stop\", \"length\", \"cancelled\"")
    strings = meta.get("stop_strings", [])  # absent in snapshots written before stop strings existed
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise SnapshotError("snapshot stop_strings must be a list of non-empty strings")
    logprobs = meta.get("logprobs")  # absent (None) in snapshots written before log-probabilities existed
    if logprobs is not None and not (
            isinstance(logprobs, list) and len(logprobs) == b
            and all(isinstance(x, list) and len(x) == len(t) for x, t in zip(logprobs, tokens))
            and all(is_real(v) and not isinstance(v, bool) and math.isfinite(v) and v <= 0
                    for x in logprobs for v in x)):
        raise SnapshotError("snapshot logprobs must be null or, per sequence, one finite number <= 0 per token")
    history = meta.get("history", [[] for _ in prompts])  # absent before conversations kept their history
    if not isinstance(history, list) or len(history) != b:
        raise SnapshotError(f"snapshot history must be a list of {b} token lists (one per prompt)")
    history = [_id_list(h, "history", vocab) for h in history]
    return dict(prompts=prompts, max_new_tokens=int(limit), tokens=tokens, finish_reasons=list(reasons),
                history=history,
                stop_tokens=_id_list(meta["stop_tokens"], "stop_tokens", vocab), stop_strings=tuple(strings),
                logprobs=None if logprobs is None else [[float(v) for v in x] for x in logprobs])


def _rebuild(runtime, meta: dict) -> Generation:
    """A Generation with the snapshot's prompts, settings, tokens so far and generator states (no state yet)."""
    checked = _checked_meta(meta, runtime.info.vocab_size)
    if not isinstance(meta["sampling"], dict):
        raise SnapshotError("snapshot sampling settings must be an object")
    try:
        sampling = SamplingConfig(**meta["sampling"])
    except GenerationInputError as e:
        raise SnapshotError(f"snapshot sampling settings are invalid ({e})") from None
    if checked["stop_strings"] and runtime.codec is None:
        why = runtime.codec_unavailable or NO_TOKENIZER
        raise SnapshotError(f"snapshot has stop strings, and matching them needs a tokenizer ({why})")
    gen = Generation(runtime, checked["prompts"], checked["max_new_tokens"], sampling,
                     frozenset(checked["stop_tokens"]), checked["stop_strings"], history=checked["history"])
    gen.tokens, gen.finish_reasons, gen.logprobs = checked["tokens"], checked["finish_reasons"], checked["logprobs"]
    for i, t in enumerate(gen.tokens):
        gen.sampler.observe([i] * len(t), t)
        if gen._stop_text[i] is not None:  # the text so far, decoded again, up to the token that ended it
            for token in t:
                if gen._stops(i, token):
                    break
    gen.sampler.set_rng_states(meta["rng"])
    return gen
