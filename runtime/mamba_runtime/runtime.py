"""The Python runtime: open an export directory, then generate from token ids or text.

Example::

    from mamba_runtime import MambaRuntime, SamplingConfig

    rt = MambaRuntime("out/")                                   # checks manifest.json and the checksums
    print(rt.generate("Hello", max_new_tokens=20).texts[0])     # greedy
    for tok in rt.stream([1, 2, 3], 50, SamplingConfig(temperature=0.8, top_p=0.9, seed=0)):
        ...
    gen = rt.start(["a", "longer prompt"], 100)                  # a batch of uneven prompts
    gen.step(); blob = gen.snapshot()                            # ... later, maybe in another process:
    rt.restore(blob).run()

Prefill runs model_last.onnx (or model.onnx) per prompt, decode runs decode.onnx once per token for the whole batch
with the state kept on the device (see :mod:`.state`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .device import select_device
from .errors import ExportDirError, GenerationInputError, SnapshotError, require_int
from .generation import MAX_NEW_TOKENS, Generation, GenerationResult, load_snapshot
from .manifest import ExportInfo, WeightCheck, open_export_dir
from .sampling import SamplingConfig
from .sessions import (check_io, check_ort_config, cpu_placed_nodes, open_session, resolve_library,
                       session_options)
from .state import DeviceState, prefill
from .stopping import StopText, check_stop_strings
from .tokenizer import NO_TOKENIZER, TokenizerUnavailable, load_codec, require_codec

Prompt = str | Iterable[int]


class MambaRuntime:
    """An opened export directory, ready to generate.

    Args:
        export_dir: the directory written by ``mamba-export export``.
        provider: "cpu", "cuda" or "auto" (CUDA when this onnxruntime has it). ``self.device.name`` says which.
        threads: onnxruntime intra-op threads (None: its default, one per physical core).
        custom_ops: "auto" (the library when found, else the graphs' function fallbacks with a warning),
            "require" or "off". ``self.custom_op_library`` is the registered path or None.
        verify: check every file's sha256 against the manifest (reads every byte once).
        max_batch: the largest batch :meth:`start` accepts.
        prefill_chunk: the most prompt tokens per prefill run (default 1024 with model_last.onnx, 128 with
            model.onnx, whose logits cover every position); longer prompts run in chunks, carrying the state.
        ort_config: onnxruntime session config entries for both sessions, passed through unchecked (as the C++
            runtime's ``ort_config``), e.g. ``{"session.disable_prepacking": "1"}`` to keep the weights memory-mapped
            and shared by the two sessions instead of a pre-packed copy in each (docs/runtime.md, "Memory").
    """

    def __init__(self, export_dir: str | Path, *, provider: str = "auto", threads: int | None = None,
                 custom_ops: str = "auto", verify: bool = True, max_batch: int = 256,
                 prefill_chunk: int | None = None, ort_config: Mapping[str, str] | None = None):
        self.ort_config = check_ort_config(ort_config)
        self.info: ExportInfo = open_export_dir(export_dir, verify, weights_later=True)
        self.device = select_device(provider)
        self.custom_op_library = resolve_library(self.info, custom_ops)
        self.threads = threads
        if prefill_chunk is None:
            prefill_chunk = 1024 if self.info.prefill_graph == "model_last.onnx" else 128
        self.max_batch = require_int(max_batch, "max_batch")
        self.prefill_chunk = require_int(prefill_chunk, "prefill_chunk")
        self.codec_unavailable = None  # why the export's tokenizer.json cannot be read here (token ids still work)
        try:
            self.codec = load_codec(self.info.path)
        except TokenizerUnavailable as e:
            self.codec, self.codec_unavailable = None, str(e)
        with WeightCheck(self.info, verify):  # the weight files' sha256, while onnxruntime loads them
            self._open_sessions(threads)

    def _open_sessions(self, threads: int | None) -> None:
        so = session_options(threads, self.custom_op_library, config=self.ort_config)
        self.prefill_session = open_session(self.info.path / self.info.prefill_graph, so, self.device.providers())
        self.decode_session = open_session(self.info.path / "decode.onnx", so, self.device.providers())
        prefill_dtype = check_io(self.prefill_session, self.info, self.info.prefill_graph)
        self.logits_dtype = check_io(self.decode_session, self.info, "decode.onnx")
        if prefill_dtype != self.logits_dtype:  # e.g. a decode.onnx of another (float16) export copied in
            raise ExportDirError(f"{self.info.path / 'decode.onnx'}: logits are {self.logits_dtype}, but "
                                 f"{self.info.prefill_graph}'s are {prefill_dtype}")
        # Per graph, the compute nodes onnxruntime placed on the CPU under a GPU provider (warned about when the
        # sessions opened); None on the CPU provider or where onnxruntime cannot say.
        self.cpu_nodes = {self.info.prefill_graph: cpu_placed_nodes(self.prefill_session),
                          "decode.onnx": cpu_placed_nodes(self.decode_session)}

    # ---- text -------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (needs tokenizer.json or byte_vocab.json in the export)."""
        return require_codec(self.codec, "text input", self.codec_unavailable).encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return require_codec(self.codec, "text output", self.codec_unavailable).decode(list(ids))

    # ---- building blocks --------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> DeviceState:
        """Zero state for ``batch`` sequences on the device, with decode.onnx bound to it."""
        return DeviceState(self.decode_session, self.device, self.info.state_shapes(batch), self.info.n_layer,
                           self.logits_dtype, self.info.vocab_size)

    def prefill(self, prompts: list[list[int]], start: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts of any lengths, each from a zero state (or, with ``start``, from row i of its conv (L, b, E, K-1)
        and ssm (L, b, E, N)): last logits (b, V), conv (L, b, E, K-1), ssm (L, b, E, N).

        Prompts of equal length run together, ``prefill_chunk`` tokens per graph run in all (rows then positions);
        no prompt is padded.
        """
        b, L = len(prompts), self.info.n_layer
        conv_shape, ssm_shape = self.info.state_shapes(b)
        logits = np.empty((b, self.info.vocab_size), dtype=self.logits_dtype)
        conv, ssm = np.empty((L, *conv_shape), np.float32), np.empty((L, *ssm_shape), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        for length, rows in by_length.items():
            per_run = max(1, self.prefill_chunk // length)
            for j in range(0, len(rows), per_run):
                part = rows[j:j + per_run]
                ids = np.array([prompts[i] for i in part], dtype=np.int64)
                logits[part], conv[:, part], ssm[:, part] = prefill(
                    self.prefill_session, self.device, self.info.state_shapes(len(part)), L, ids,
                    self.prefill_chunk, None if start is None else (start[0][:, part], start[1][:, part]))
        return logits, conv, ssm

    def _prompt_ids(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise GenerationInputError(f"prompt {index} is bytes: give text (a str) or a list of token ids (for a "
                                       "byte-level vocabulary, list(data) are the ids of the bytes data)")
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            try:
                items = list(prompt)
                arr = np.asarray(items)
            except (TypeError, ValueError):  # not iterable; a ragged nesting such as [3, [4]]
                items, arr = [], None
            if arr is None or (arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer))) or any(
                    isinstance(t, (bool, np.bool_)) for t in items):  # numpy would take True for 1
                raise GenerationInputError(f"prompt {index}: expected text or a flat list of integer token ids")
            ids = [int(t) for t in arr]
        if not ids:
            raise GenerationInputError(f"prompt {index} is empty: give at least one token")
        self._check_ids(ids, f"prompt {index}")
        return ids

    def _check_ids(self, ids: Iterable[int], what: str) -> None:
        v = self.info.vocab_size
        for j, t in enumerate(ids):
            if not 0 <= t < v:
                raise GenerationInputError(f"{what}: token id {t} at position {j} is outside the vocabulary [0, {v})")

    def _prompts(self, prompts: Prompt | list[Prompt]) -> list[list[int]]:
        """One prompt (text or ids) or a list of them -> a list of id lists."""
        if isinstance(prompts, (str, bytes, bytearray, memoryview)) or (
                isinstance(prompts, (list, tuple, np.ndarray)) and getattr(prompts, "ndim", 1) > 0
                and len(prompts) > 0 and isinstance(prompts[0], (int, np.integer, float, np.floating))):
            prompts = [prompts]
        try:
            prompts = list(prompts)
        except TypeError:
            raise GenerationInputError(f"prompts must be text, a list of token ids or a list of those, not "
                                       f"{type(prompts).__name__}") from None
        if not prompts:
            raise GenerationInputError("no prompt given")
        if len(prompts) > self.max_batch:
            raise GenerationInputError(f"batch of {len(prompts)} prompts is over the limit of {self.max_batch} "
                                       "(max_batch)")
        return [self._prompt_ids(p, i) for i, p in enumerate(prompts)]

    # ---- generation -------------------------------------------------------------------------------------------
    def start(self, prompts: Prompt | list[Prompt], max_new_tokens: int, sampling: SamplingConfig | None = None,
              stop_tokens: Iterable[int] = (), stop_strings: str | Iterable[str] = (), logprobs: bool = False
              ) -> Generation:
        """Prefill one prompt or a batch (text or token ids, any lengths) and return the :class:`Generation`.
        A sequence ends at a stop token (kept in its tokens, left out of its text) or as soon as its generated text
        contains one of ``stop_strings`` (a string or a list; needs a tokenizer): its tokens end with the one that
        completed the match, and its text is cut where the match starts. ``logprobs=True``: the result also holds
        each generated token's log-probability under the model (:class:`GenerationResult`)."""
        max_new_tokens, sampling, stops, strings, logprobs = self._settings(max_new_tokens, sampling, stop_tokens,
                                                                            stop_strings, logprobs)
        gen = Generation(self, self._prompts(prompts), max_new_tokens, sampling, stops, strings, logprobs)
        gen.prefill()
        return gen

    def _settings(self, max_new_tokens: int, sampling: SamplingConfig | None, stop_tokens: Iterable[int],
                  stop_strings: str | Iterable[str] = (), logprobs: bool = False
                  ) -> tuple[int, SamplingConfig, frozenset[int], tuple[str, ...], bool]:
        """A generation's settings, checked: max_new_tokens, the sampling config (None: greedy), the stop set, the
        stop strings (which need a tokenizer), whether to keep log-probabilities."""
        max_new_tokens = require_int(max_new_tokens, "max_new_tokens")
        if max_new_tokens > MAX_NEW_TOKENS:
            raise GenerationInputError(f"max_new_tokens must be at most {MAX_NEW_TOKENS}, found {max_new_tokens}")
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise GenerationInputError(f"sampling must be a SamplingConfig (or None for greedy), not "
                                       f"{type(sampling).__name__}")
        stops = _stop_set(stop_tokens)
        self._check_ids(sorted(stops), "stop tokens")
        strings = check_stop_strings(stop_strings)
        if strings and self.codec is None:
            why = self.codec_unavailable or NO_TOKENIZER
            raise GenerationInputError(f"stop strings: matching them needs a tokenizer ({why}); use stop tokens "
                                       "instead")
        if not isinstance(logprobs, (bool, np.bool_)):
            raise GenerationInputError(f"logprobs must be True or False, found {logprobs!r:.60}")
        return max_new_tokens, sampling or SamplingConfig(), stops, strings, bool(logprobs)

    def generate(self, prompts: Prompt | list[Prompt], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 stop_tokens: Iterable[int] = (),
                 callback: Callable[[np.ndarray], bool | None] | None = None,
                 stop_strings: str | Iterable[str] = (), logprobs: bool = False) -> GenerationResult:
        """Generate for one prompt or a batch; ``callback(new_tokens (b,))`` returning True stops early. Stop tokens,
        stop strings and logprobs as in :meth:`start`."""
        return self.start(prompts, max_new_tokens, sampling, stop_tokens, stop_strings, logprobs).run(callback)

    def stream(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_tokens: Iterable[int] = (), stop_strings: str | Iterable[str] = ()) -> Iterator[int]:
        """Token ids of one prompt's continuation as they are generated (stop by leaving the loop), the last one
        being a stop token or the one that completed a stop string where one ended it. The prompt is checked and
        prefilled in this call, so a bad request fails here, before the first token is asked for."""
        gen = self._one(prompt, max_new_tokens, sampling, stop_tokens, stop_strings, "stream")
        return (int(new[0]) for new in gen)

    def stream_text(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingConfig | None = None,
                    stop_tokens: Iterable[int] = (), stop_strings: str | Iterable[str] = ()) -> Iterator[str]:
        """Pieces of text of one prompt's continuation as they complete. A stop token is not printed, nor a stop
        string or anything after it: text that could be the start of a stop string is held back until the next
        tokens tell. Checked and prefilled in this call, as :meth:`stream`."""
        codec = require_codec(self.codec, "text output", self.codec_unavailable)
        gen = self._one(prompt, max_new_tokens, sampling, stop_tokens, stop_strings, "stream_text")
        if gen._stop_text[0] is None:  # no stop strings: a watcher of none, which holds nothing back
            gen._stop_text[0] = StopText(codec.stream(), ())
        text = gen._stop_text[0]  # fed by the generation as it steps

        def pieces() -> Iterator[str]:
            for _ in gen:
                if piece := text.take():
                    yield piece
            if tail := text.finish():
                yield tail

        return pieces()

    def _one(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingConfig | None, stop_tokens: Iterable[int],
             stop_strings: str | Iterable[str], what: str) -> Generation:
        """A started Generation of one prompt, for the streaming calls."""
        prompts = self._prompts(prompt)
        if len(prompts) != 1:
            raise GenerationInputError(f"{what} takes one prompt, found a batch of {len(prompts)}; for a batch, "
                                       "iterate start(prompts, ...) or use generate()")
        return self.start(prompts, max_new_tokens, sampling, stop_tokens, stop_strings)

    def restore(self, snapshot: bytes | str | Path) -> Generation:
        """A :class:`Generation` from :meth:`Generation.snapshot` bytes or a file written by ``Generation.save``."""
        if isinstance(snapshot, (bytes, bytearray, memoryview)):
            return load_snapshot(self, bytes(snapshot))
        if not isinstance(snapshot, (str, os.PathLike)):
            raise SnapshotError(f"restore takes snapshot bytes or a file path, not {type(snapshot).__name__}")
        path = Path(snapshot)
        if not path.is_file():
            raise SnapshotError(f"{path}: snapshot file does not exist")
        return load_snapshot(self, path.read_bytes())


def _stop_set(stop_tokens) -> frozenset[int]:
    """Stop tokens as a set of ints; one token id alone is a mistake worth a clear message (it is not iterable)."""
    try:
        return frozenset(int(t) for t in stop_tokens)
    except TypeError:
        raise GenerationInputError(f"stop_tokens must be a collection of token ids (e.g. [0]), not "
                                   f"{type(stop_tokens).__name__}") from None
    except ValueError as e:
        raise GenerationInputError(f"stop_tokens must hold integer token ids ({e})") from None
