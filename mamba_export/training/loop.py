"""The training loop: AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on GPU, periodic
evaluation in bits per byte on held-out text, and checkpoints that resume exactly.

A run writes one directory, replaced atomically at every save (:func:`mamba_export.checkpoint.save_checkpoint`):

    config.json, model.safetensors   the model, in the state-spaces/mamba layout (loads with ``load_checkpoint``)
    byte_vocab.json | tokenizer.json the tokenizer the exporter copies
    train_state.pt                   optimiser moments, step, RNG states, preset, SHA-256 of the text and of the
                                     tokenizer: what ``--resume`` needs
    train_log.jsonl                  one JSON object per step (loss, lr, grad norm, held-out bpb where evaluated)
    loss_curve.png                   training and held-out bits per byte against the step
    training.json                    a summary: preset, data, steps, tokens, time, held-out bits per byte

The first SIGINT or SIGTERM (in the main thread) stops a run after its current step with such a save and raises
:class:`~mamba_export.errors.Interrupted`; a second one aborts at once (see :class:`_StopRequest`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import outdir
from ..checkpoint import is_checkpoint_dir, load_checkpoint, save_checkpoint
from ..config import MambaConfig
from ..errors import Interrupted, MambaExportError
from ..model import MambaLM
from .data import TOKENIZER_FILE, Corpus, load_corpus, sample_batch
from .init import init_mamba_weights
from .presets import Preset, get_preset

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "training.json"


@dataclasses.dataclass
class TrainOptions:
    """What ``mamba-export train`` was asked to do.

    Attributes:
        data: the training text file.
        out: the checkpoint directory to write (or to resume from).
        preset: preset name; None only with ``resume`` (the stored preset is used).
        steps: total optimiser steps, overriding the preset's.
        until: stop (with a checkpoint) after this step, to resume later; None runs to ``steps``.
        resume: continue the run stored in ``out``.
        force: replace an existing ``out``.
        tokenizer: a tokenizers ``tokenizer.json``; None trains a byte-level model. With ``resume``, None uses the
            tokenizer the run was trained with (the checkpoint's copy); a file given must have the same content.
        backend: operator backend of the model ("fast", "reference", "triton", "auto"; see mamba_export.backends).
            None: "fast", or with ``resume`` the backend the run was started (or last resumed) with.
        device: "cpu", "cuda" or "auto" (CUDA when available). None: "auto", or with ``resume`` the run's own.
        cuda_graph: "auto" (on CUDA), "on" or "off": run the training step as one CUDA graph (see _GraphedStep).
        progress: show a progress bar.
    """

    data: str
    out: str
    preset: str | None = None
    steps: int | None = None
    until: int | None = None
    resume: bool = False
    force: bool = False
    tokenizer: str | None = None
    backend: str | None = None
    device: str | None = None
    cuda_graph: str = "auto"
    progress: bool = True


@dataclasses.dataclass
class RunState:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    preset_name: str
    preset: Preset
    step: int = 0
    wall_s: float = 0.0
    log: list[dict] = dataclasses.field(default_factory=list)
    optimizer: dict | None = None
    batch_rng: torch.Tensor | None = None
    torch_rng: torch.Tensor | None = None
    data_sha256: str = ""
    tokenizer_sha256: str | None = None  # of the tokenizer.json the run encodes its text with; None: byte-level
    backend: str = "fast"  # as asked (--backend, --device), so that --resume continues with the same
    device: str = "auto"
    graphed: bool = False  # whether this session's steps ran as CUDA graph replays (not saved: per session)


def lr_at(step: int, p: Preset) -> float:
    """Learning rate of 0-based ``step``: linear warm-up to ``p.lr``, then cosine decay to ``p.lr * p.min_lr_ratio``."""
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    progress = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(model: MambaLM, p: Preset) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) decaying only projection and convolution weights (not A_log, D, norms, biases, the
    embedding), as state-spaces/mamba does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_weight = name.endswith(".weight") and param.ndim >= 2 and "embedding" not in name
        (decay if is_weight else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=True if cuda else None)


def _set_update_kernel(opt: torch.optim.AdamW, device: torch.device, capturable: bool) -> None:
    """AdamW's implementation for parameters on ``device``: fused (one multi-tensor kernel for the whole update) on
    CUDA, torch's default elsewhere, and capturable (for CUDA graphs) as asked. A resumed run's optimiser state brings
    the flags of the run that saved it, so they are set here, and the step counts moved to where the fused and
    capturable kernels read them (the device, float32) or back to the CPU."""
    cuda = device.type == "cuda"
    for g in opt.param_groups:
        g["fused"], g["foreach"], g["capturable"] = (True if cuda else None), None, capturable
    for state in opt.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device if cuda else "cpu", dtype=torch.float32)


def _autocast(device: torch.device):
    """bf16 autocast on GPU; plain float32 on CPU. Without autocast's cast cache, which CUDA graph capture needs (the
    step casts each weight once anyway), so that the eager and the graphed step compute the same."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_bits(model: MambaLM, ids: torch.Tensor, streams: int, seq_len: int,
                  should_stop: Callable[[], bool] | None = None,
                  token_bytes: torch.Tensor | None = None) -> tuple[float, int] | None:
    """Negative log-likelihood of ``ids`` (n,) in bits, and how many tokens were scored; with ``token_bytes`` (n,),
    how many bytes those scored tokens cover instead of how many tokens.

    The ids are cut into ``streams`` contiguous pieces run side by side, window by window of ``seq_len``, carrying
    the recurrent state across windows: every token but the first of each piece is scored with its whole piece as
    context. ``should_stop`` is asked before each window; when it says True the evaluation is abandoned and None
    returned (it changes nothing but the model's train/eval mode, which is restored).
    """
    was_training = model.training
    model.eval()
    try:
        device = model.lm_head.weight.device
        per = len(ids) // streams
        x = ids[: streams * per].view(streams, per).to(device)
        weight = None if token_bytes is None else token_bytes[: streams * per].view(streams, per)
        state, nats, scored = None, 0.0, 0
        for t in range(0, per - 1, seq_len):
            if should_stop is not None and should_stop():
                return None
            end = min(t + seq_len, per - 1)
            inp, tgt = x[:, t:end], x[:, t + 1:end + 1]
            with _autocast(device):
                logits, state = model(inp, state)
            nats += float(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum"))
            if weight is None:
                scored += tgt.numel()
            else:
                scored += int(weight[:, t + 1:end + 1].sum())
    finally:
        model.train(was_training)
    return nats / math.log(2), scored


def heldout_bpb(model: MambaLM, corpus: Corpus, p: Preset, max_tokens: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> float | None:
    """Bits per byte on the held-out text (its first ``max_tokens`` tokens, or all of it); None if ``should_stop``
    cut the evaluation short (see :func:`evaluate_bits`).

    The bits are divided by the bytes of the tokens scored (each stream's first token is context only): one a token
    for a byte-level model, ``corpus.heldout_token_bytes`` for a tokenizer's."""
    ids = corpus.heldout if max_tokens is None else corpus.heldout[:max_tokens]
    streams = max(1, min(p.batch_size, len(ids) // (p.seq_len + 1)))  # each stream at least one window long
    result = evaluate_bits(model, ids, streams, p.seq_len, should_stop, corpus.heldout_token_bytes)
    if result is None:
        return None
    bits, scored_bytes = result
    if scored_bytes == 0:  # a tokenizer whose scored tokens all lie inside one character
        raise MambaExportError("the held-out tokens scored cover no bytes of the text; hold out more of it")
    return bits / scored_bytes


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MambaExportError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise MambaExportError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def _check_output(opts: TrainOptions) -> None:
    """One-line errors, before any work, for an output directory that does not fit --resume / --force, that every
    save would replace while it holds the run's inputs or the current directory, or that cannot be written."""
    out = outdir.output_path(opts.out)
    if opts.resume and opts.force:
        raise MambaExportError("--resume and --force exclude each other")
    if out.exists() and not out.is_dir():
        raise MambaExportError(f"{out}: is a file, not a checkpoint directory")
    if opts.resume:
        if not (out / STATE_FILE).is_file():
            raise MambaExportError(f"{out}: nothing to resume (no {STATE_FILE}; was it written by mamba-export train?)")
    elif out.exists() and not opts.force and any(out.iterdir()):
        raise MambaExportError(f"{out}: already exists; pass --resume to continue its training or --force to "
                               "replace it")
    if out.exists():
        inputs = {"--data": Path(opts.data)}
        # --resume reads the checkpoint's own tokenizer.json before the first save replaces it; any other file in
        # the directory would be lost
        tok = Path(opts.tokenizer) if opts.tokenizer else None
        if tok is not None and not (opts.resume and tok.resolve() == (out / TOKENIZER_FILE).resolve()):
            inputs["--tokenizer"] = tok
        outdir.check_replace(out, "a checkpoint directory (config.json and weights)", is_checkpoint_dir, inputs)
    outdir.check_writable(out)


_STATE_KEYS = ("step", "wall_s", "preset_name", "preset", "optimizer", "batch_rng", "torch_rng", "data_sha256")


def _first_line(e: BaseException) -> str:
    """An exception's message cut to its first sentence (torch's run on with advice that does not apply here)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]


def _load_run_state(out: Path, opts: TrainOptions) -> RunState:
    """The state and log of the run stored in ``out``; one line naming the file for one that is unreadable,
    incomplete or inconsistent (a truncated copy, a hand edit)."""
    path = out / STATE_FILE
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError, EOFError, UnpicklingError, OSError, ...
        raise MambaExportError(f"{path}: cannot be read as a training state; damaged or truncated? "
                               f"({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise MambaExportError(f"{path}: not a training state (a {type(raw).__name__}, not a dictionary)")
    missing = [k for k in _STATE_KEYS if k not in raw]
    if missing:
        raise MambaExportError(f"{path}: not a complete training state (missing {', '.join(missing)})")
    try:
        preset = Preset.from_dict(raw["preset"])
        step, wall_s = int(raw["step"]), float(raw["wall_s"])
    except (TypeError, ValueError) as e:
        raise MambaExportError(f"{path}: bad preset or step ({_first_line(e)})") from None
    if opts.preset is not None and opts.preset != raw["preset_name"]:
        raise MambaExportError(f"{out}: was trained with preset {raw['preset_name']!r}, not {opts.preset!r}")
    if "tokenizer_sha256" in raw:
        tok_sha = raw["tokenizer_sha256"]
    else:  # a state written before the key existed: the checkpoint's tokenizer file says what the run used
        tok_sha = outdir.sha256_file(out / TOKENIZER_FILE) if (out / TOKENIZER_FILE).is_file() else None
    log = _read_log(out / LOG_FILE, step)
    backend, device = raw.get("backend", "fast"), raw.get("device", "auto")  # absent: a state from before the keys
    if not isinstance(backend, str) or not isinstance(device, str):
        raise MambaExportError(f"{path}: bad backend or device ({backend!r}, {device!r})")
    return RunState(raw["preset_name"], preset, step, wall_s, log, raw["optimizer"], raw["batch_rng"],
                    raw["torch_rng"], raw["data_sha256"], tok_sha, backend, device)


def _read_log(path: Path, step: int) -> list[dict]:
    """The records of train_log.jsonl: one JSON object per step, steps 1 to ``step``."""
    if not path.is_file():
        raise MambaExportError(f"{path}: missing (the run's log, which --resume continues)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MambaExportError(f"{path}: cannot be read ({_first_line(e)})") from None
    log = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MambaExportError(f"{path}: line {i} is not JSON ({e.msg})") from None
        if not (isinstance(rec, dict) and rec.get("step") == len(log) + 1 and isinstance(rec.get("loss"), float)):
            raise MambaExportError(f"{path}: line {i} is not the record of step {len(log) + 1}")
        log.append(rec)
    if len(log) != step:
        raise MambaExportError(f"{path}: holds {len(log)} steps, but {STATE_FILE} is at step {step}")
    return log


def _resume_tokenizer(out: Path, rs: RunState, opts: TrainOptions) -> str | None:
    """The tokenizer file a resumed run encodes its text with: the one the run was trained with, the checkpoint's
    copy unless --tokenizer names a file of the same content; None for a byte-level run. One-line errors for a
    --tokenizer that does not fit the run."""
    stored = out / TOKENIZER_FILE
    if rs.tokenizer_sha256 is None:
        if opts.tokenizer is not None:
            raise MambaExportError(f"--tokenizer {opts.tokenizer}: the run in {out} is byte-level (trained without "
                                   "--tokenizer); resume it without --tokenizer")
        return None
    if opts.tokenizer is None:
        if not stored.is_file():
            raise MambaExportError(f"{stored}: missing (the run was trained with a tokenizer, which the checkpoint "
                                   "keeps); pass the same file with --tokenizer")
        return str(stored)
    given = Path(opts.tokenizer)
    if not given.is_file():
        raise MambaExportError(f"{given}: tokenizer file not found")
    try:
        same = outdir.sha256_file(given) == rs.tokenizer_sha256
    except OSError as e:
        raise MambaExportError(f"{given}: cannot read the tokenizer ({e.strerror})") from None
    if not same:
        raise MambaExportError(f"--tokenizer {given}: not the tokenizer this run was trained with (its SHA-256 "
                               f"differs); leave --tokenizer out to use the run's own ({stored})")
    return str(given)


def _new_run_state(opts: TrainOptions) -> RunState:
    if opts.preset is None:
        raise MambaExportError("--preset is required (unless --resume continues a run)")
    return RunState(opts.preset, get_preset(opts.preset))


def build_model(vocab_size: int, p: Preset, backend: str) -> MambaLM:
    """The preset's model for ``vocab_size`` tokens (rounded up to a multiple of 8), initialised as state-spaces/mamba
    does from the preset's seed."""
    vocab = vocab_size + (-vocab_size) % 8
    cfg = MambaConfig(d_model=p.d_model, n_layer=p.n_layer, vocab_size=vocab, d_state=p.d_state, expand=p.expand,
                      real_vocab_size=vocab_size)
    torch.manual_seed(p.seed)
    model = MambaLM(cfg, backend=backend)
    init_mamba_weights(model)
    return model


def _plot(log: list[dict], title: str) -> bytes:
    """The loss curve as PNG bytes: training bits per token (raw and a trailing mean) and held-out bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    bits = [r["loss"] / math.log(2) for r in log]
    window = 20
    smooth = [sum(bits[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(bits))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, bits, color="0.8", lw=0.8, label="training batch (bits/token)")
    ax.plot(steps, smooth, color="C0", label=f"training, mean of the last {window} steps")
    ev = [(r["step"], r["heldout_bpb"]) for r in log if "heldout_bpb" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", color="C1", ms=3, label="held-out (bits/byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _save(model, opt, rs: RunState, corpus: Corpus, opts: TrainOptions, gen: torch.Generator, summary: dict) -> None:
    state = {
        "step": rs.step, "wall_s": rs.wall_s, "preset_name": rs.preset_name, "preset": rs.preset.to_dict(),
        "optimizer": opt.state_dict(), "batch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "data_sha256": corpus.sha256, "tokenizer_sha256": corpus.tokenizer_sha256,
        "backend": opts.backend, "device": opts.device,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    files = {
        **corpus.tokenizer_files,
        STATE_FILE: buf.getvalue(),
        LOG_FILE: "".join(json.dumps(r) + "\n" for r in rs.log),
        CURVE_FILE: _plot(rs.log, f"{rs.preset_name}: {Path(opts.data).name}"),
        SUMMARY_FILE: json.dumps(summary, indent=2) + "\n",
    }
    save_checkpoint(model, opts.out, extra_files=files)


def _summary(rs: RunState, corpus: Corpus, opts: TrainOptions, model: MambaLM, final_bpb: float | None) -> dict:
    last_eval = next((r for r in reversed(rs.log) if "heldout_bpb" in r), None)
    p = rs.preset
    return {
        "preset": rs.preset_name, "hyperparameters": p.to_dict(), "config": model.config.to_dict(),
        "parameters": sum(t.numel() for t in {id(t): t for t in model.parameters()}.values()),
        "data": {"file": Path(opts.data).name, "sha256": corpus.sha256, "train_tokens": len(corpus.train),
                 "heldout_tokens": len(corpus.heldout), "heldout_bytes": corpus.heldout_bytes,
                 "tokenizer": "bytes" if corpus.tokenizer_sha256 is None else TOKENIZER_FILE,
                 "tokenizer_sha256": corpus.tokenizer_sha256},
        "steps_done": rs.step, "tokens_seen": rs.step * p.batch_size * p.seq_len, "wall_s": round(rs.wall_s, 1),
        "backend": model.backend.name, "device": str(model.lm_head.weight.device), "cuda_graph": rs.graphed,
        "torch": torch.__version__,
        "last_eval": last_eval and {"step": last_eval["step"], "heldout_bpb": last_eval["heldout_bpb"],
                                    "on_tokens": min(p.eval_tokens, len(corpus.heldout))},
        "final_heldout_bpb": final_bpb,
    }


def _step_math(model, opt, x, y, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients set to None, then forward, backward, clipping and the optimiser step on inputs x and targets y
    (b, l). Returns the loss (nats/token) and the gradient norm as tensors (no host synchronisation)."""
    opt.zero_grad(set_to_none=True)
    with _autocast(x.device):
        logits, _ = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), grad_norm


def _train_step(model, opt, x, y, lr: float, p: Preset) -> tuple[float, float]:
    """One optimiser step on inputs x and targets y (b, l). Returns the loss (nats/token) and the gradient norm."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss, grad_norm = _step_math(model, opt, x, y, p.grad_clip)
    return float(loss), float(grad_norm)


class _GraphedStep:
    """The training step as one CUDA graph, replayed with each batch copied into its static inputs and the learning
    rate into a device scalar that AdamW reads (capturable mode). It computes what _train_step computes; it saves
    the host's share of a step (Python, autograd, kernel launches), which is most of a step for the small presets
    (tools/bench_train.py). The first WARMUP steps run eagerly on a side stream (torch's recipe for whole-network
    capture: the optimiser's state and the allocator settle); the graph is captured at the next one. If the capture
    fails (an operator that synchronises with the host, say), the steps run eagerly after ``warn`` is told why; with
    ``strict`` (--cuda-graph on) it is an error instead."""

    WARMUP = 3

    def __init__(self, model, opt, p: Preset, strict: bool, warn: Callable[[str], None]):
        dev = model.lm_head.weight.device
        self.model, self.opt, self.clip, self.strict, self.warn = model, opt, p.grad_clip, strict, warn
        self.x = torch.zeros((p.batch_size, p.seq_len), dtype=torch.long, device=dev)
        self.y = torch.zeros_like(self.x)
        self.lr = torch.tensor(p.lr, dtype=torch.float32, device=dev)
        _set_update_kernel(opt, dev, capturable=True)
        for g in opt.param_groups:
            g["lr"] = self.lr
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager_steps = 0
        self.fallback = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, float]:
        self.lr.fill_(lr)
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is None and not self.fallback and self.eager_steps >= self.WARMUP:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            loss, grad_norm = self.outputs
        elif self.fallback:
            loss, grad_norm = _step_math(self.model, self.opt, self.x, self.y, self.clip)
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss, grad_norm = _step_math(self.model, self.opt, self.x, self.y, self.clip)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        return float(loss), float(grad_norm)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = _step_math(self.model, self.opt, self.x, self.y, self.clip)
        except RuntimeError as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if self.strict:
                raise MambaExportError(f"--cuda-graph on: the training step cannot be captured ({why})") from None
            self.fallback = True
            torch.cuda.synchronize()
            self.warn(f"mamba-export train: the training step could not be captured in a CUDA graph ({why}); "
                      "going on without")
            return
        self.graph = graph


def _check_cuda_graph(opts: TrainOptions, device: torch.device) -> None:
    if opts.cuda_graph not in ("auto", "on", "off"):
        raise MambaExportError(f"unknown --cuda-graph {opts.cuda_graph!r}; choose auto, on or off")
    if opts.cuda_graph == "on" and device.type != "cuda":
        raise MambaExportError("--cuda-graph on needs a CUDA device (--device cuda)")


def _step_runner(model, opt, p: Preset, opts: TrainOptions, warn: Callable[[str], None]):
    """The step function _run_steps calls, (x, y, lr) -> (loss, grad norm): a _GraphedStep on CUDA unless
    ``opts.cuda_graph`` is "off", else _train_step (with AdamW out of capturable mode, which a run resumed from a
    graphed one would otherwise keep, and which the CPU does not support)."""
    device = model.lm_head.weight.device
    if device.type == "cuda" and opts.cuda_graph != "off":
        return _GraphedStep(model, opt, p, opts.cuda_graph == "on", warn)
    _set_update_kernel(opt, device, capturable=False)
    return lambda x, y, lr: _train_step(model, opt, x, y, lr, p)


class _StopRequest:
    """SIGINT and SIGTERM handlers for the training steps of a run (a context manager). The first signal only sets
    ``signum``: the run finishes its current step (an evaluation in progress is abandoned), saves and stops. A second
    one raises KeyboardInterrupt at once, even in the middle of that save, whose atomic replacement leaves the
    previous checkpoint in place. Handlers can only be set from the main thread; elsewhere (train() called from
    another thread) none is installed and signals keep their usual effect. The previous handlers are restored on
    exit."""

    def __init__(self):
        self.signum: int | None = None
        self.second: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous.clear()

    STOPPING = ("mamba-export train: stopping after the current step to save it (a second Ctrl-C stops at once, "
                "without saving)")

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.second = signum
            raise KeyboardInterrupt
        self.signum = signum
        print(self.STOPPING, file=sys.stderr, flush=True)  # at once: a CPU step can take seconds

    def requested(self) -> bool:
        return self.signum is not None


def train(opts: TrainOptions) -> tuple[MambaLM, dict]:
    """Run (or resume) a training run as ``opts`` says. Returns the trained model and the run's summary.

    Raises :class:`~mamba_export.errors.Interrupted` (after saving a checkpoint to resume from) when a SIGINT or
    SIGTERM stopped the run early, and KeyboardInterrupt when a second one cut that save short (see
    :class:`_StopRequest`)."""
    _check_output(opts)
    out = Path(opts.out)
    rs = _load_run_state(out, opts) if opts.resume else _new_run_state(opts)
    # --backend and --device default to the run's own on --resume (an interrupted triton/cuda run goes on as one)
    if opts.resume and opts.device is None and rs.device == "cuda" and not torch.cuda.is_available():
        raise MambaExportError(f"{out}: this run trained on --device cuda and no CUDA device is available; to go on "
                               "on the CPU, resume with --device cpu (and --backend fast for a triton run)")
    opts = dataclasses.replace(opts, backend=opts.backend or rs.backend, device=opts.device or rs.device)
    if opts.steps is not None:
        if opts.steps < 1:
            raise MambaExportError(f"--steps must be at least 1, not {opts.steps}")
        rs.preset = dataclasses.replace(rs.preset, steps=opts.steps)
    p = rs.preset
    until = p.steps if opts.until is None else opts.until
    if until > p.steps:
        raise MambaExportError(f"--until {until} is past the run's last step ({p.steps}; raise --steps to train "
                               "longer)")
    if not rs.step < until and not (opts.resume and rs.step == p.steps and _final_eval_missing(out)):
        raise MambaExportError(f"nothing to do: the run is at step {rs.step}, asked to stop at {until} of {p.steps}")
    device = _resolve_device(opts.device)
    _check_cuda_graph(opts, device)
    tokenizer = _resume_tokenizer(out, rs, opts) if opts.resume else opts.tokenizer
    corpus = load_corpus(opts.data, p.eval_fraction, p.seq_len + 1, tokenizer)
    if opts.resume and corpus.sha256 != rs.data_sha256:
        raise MambaExportError(f"{opts.data}: not the text this run was trained on (its SHA-256 differs)")
    if opts.resume and corpus.tokenizer_sha256 != rs.tokenizer_sha256:
        raise MambaExportError(f"{tokenizer}: not the tokenizer this run was trained with (its SHA-256 differs from "
                               f"the one in {STATE_FILE})")
    if opts.resume:
        model = load_checkpoint(out, dtype=torch.float32, backend=opts.backend).train()
        if corpus.vocab_size > model.config.vocab_size:
            raise MambaExportError(f"{out}: the model has {model.config.vocab_size} token ids, the tokenizer "
                                   f"{corpus.vocab_size}")
    else:
        model = build_model(corpus.vocab_size, p, opts.backend)
    model.to(device)
    opt = build_optimizer(model, p)
    gen = torch.Generator().manual_seed(p.seed + 1)
    if opts.resume:
        try:
            opt.load_state_dict(rs.optimizer)
            gen.set_state(rs.batch_rng)
            torch.set_rng_state(rs.torch_rng)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise MambaExportError(f"{out / STATE_FILE}: does not fit the checkpoint's model ({_first_line(e)})") \
                from None
    stop = _StopRequest()
    try:
        with stop:
            _run_steps(model, opt, gen, rs, corpus, opts, until, stop.requested)
            final = None
            if rs.step == p.steps and not stop.requested():
                t0 = time.perf_counter()
                final = heldout_bpb(model, corpus, p, should_stop=stop.requested)
                rs.wall_s += time.perf_counter() - t0  # the final evaluation is part of the run's time
            summary = _summary(rs, corpus, opts, model, final)
            _save(model, opt, rs, corpus, opts, gen, summary)
    except KeyboardInterrupt:
        if stop.signum is None:
            raise
        kept = "keeps its previous checkpoint" if (out / STATE_FILE).is_file() else "was not written"
        raise Interrupted(f"interrupted again before the checkpoint of step {rs.step} was saved; {opts.out} {kept}",
                          128 + (stop.second or stop.signum)) from None
    if stop.signum is not None:
        raise Interrupted(_interrupted_message(rs, opts), 128 + stop.signum)
    return model.eval(), summary


def _final_eval_missing(out: Path) -> bool:
    """Whether the run at ``out`` did its last step but was stopped before the final held-out evaluation (which a
    ``--resume`` then runs, and nothing else)."""
    try:
        return json.loads((out / SUMMARY_FILE).read_text()).get("final_heldout_bpb") is None
    except (OSError, ValueError, AttributeError):
        return True


def _interrupted_message(rs: RunState, opts: TrainOptions) -> str:
    again = shlex.join(["mamba-export", "train", "--data", opts.data, "-o", opts.out, "--resume"])
    if rs.step == rs.preset.steps:
        return (f"interrupted at step {rs.step}, the run's last; saved {opts.out} without the final held-out "
                f"evaluation (it runs with: {again})")
    return f"interrupted at step {rs.step}; saved {opts.out}; continue with: {again}"


def _run_steps(model, opt, gen, rs: RunState, corpus: Corpus, opts: TrainOptions, until: int,
               should_stop: Callable[[], bool] = lambda: False) -> None:
    """Train from ``rs.step`` to ``until``, logging every step, evaluating and saving as the preset says; progress
    and messages go to stderr. Returns early, after a complete step, when ``should_stop`` says so (an evaluation it
    cuts short is left out of that step's record)."""
    from tqdm import tqdm

    p = rs.preset
    device = model.lm_head.weight.device
    model.train()
    bar = tqdm(total=until, initial=rs.step, disable=not opts.progress, unit="step", dynamic_ncols=True,
               file=sys.stderr)

    def say(line: str) -> None:
        bar.write(line, file=sys.stderr)

    try:
        step = _step_runner(model, opt, p, opts, say)
        t0 = time.perf_counter() - rs.wall_s
        while rs.step < until and not should_stop():  # a signal during a periodic save: stop before a step
            x, y = (t.to(device) for t in sample_batch(corpus.train, p.batch_size, p.seq_len, gen))
            lr = lr_at(rs.step, p)
            loss, gnorm = step(x, y, lr)
            rs.graphed = isinstance(step, _GraphedStep) and step.graph is not None
            rs.step += 1
            rec = {"step": rs.step, "loss": loss, "lr": lr, "grad_norm": gnorm}
            if (rs.step % p.eval_every == 0 or rs.step == p.steps) and not should_stop():
                bpb = heldout_bpb(model, corpus, p, p.eval_tokens, should_stop)
                if bpb is not None:
                    rec["heldout_bpb"] = bpb
                    say(f"step {rs.step}: held-out {bpb:.3f} bits/byte")
            rs.wall_s = time.perf_counter() - t0
            rec["elapsed_s"] = round(rs.wall_s, 2)
            rs.log.append(rec)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)  # shown with its step, by update
            bar.update(1)
            if should_stop():
                break
            if rs.step % p.save_every == 0 and rs.step < until:
                _save(model, opt, rs, corpus, opts, gen, _summary(rs, corpus, opts, model, None))
    finally:
        bar.close()
