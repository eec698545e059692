"""Choosing the next token from logits: greedy, temperature, top-k, top-p and repetition penalty, in numpy.

Order of operations (the usual one, as in transformers' logits processors): repetition penalty on every token seen so
far (prompt and generated), then temperature, then top-k, then top-p (nucleus), then one draw. ``temperature == 0``
means greedy (argmax after the penalty). Every sequence of a batch draws from its own generator, so a row's tokens
do not depend on the other rows; its state is plain JSON (see :meth:`Sampler.rng_states`) so a snapshot can resume
the exact same draws in another process.

Shapes: b batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import GenerationInputError, is_int, is_real


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token.

    Attributes:
        temperature: 0 for greedy decoding, else logits are divided by it before sampling.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p (1.0: all).
        top_k and top_p need a temperature > 0 (with temperature 0 they are refused: they would change nothing).
        repetition_penalty: > 1 makes tokens already seen less likely, < 1 more likely (CTRL's rule: positive logits
            are divided by it, negative ones multiplied); 1.0 turns it off.
        seed: seed of the generators (row i of a batch uses ``default_rng([seed, i])``); None: a fresh random seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # numpy scalars are welcome; they are stored as Python numbers (the settings go into JSON: snapshots, --json)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_real(value):
                raise GenerationInputError(f"{name} must be a number, found {value!r}")
            object.__setattr__(self, name, float(value))
        if not is_int(self.top_k) or self.top_k < 0:
            raise GenerationInputError(f"top_k must be an integer >= 0, found {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            if not is_int(self.seed) or self.seed < 0:
                raise GenerationInputError(f"seed must be an integer >= 0, found {self.seed!r}")
            object.__setattr__(self, "seed", int(self.seed))
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationInputError(f"temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationInputError(f"top_p must be in (0, 1], found {self.top_p}")
        if not (np.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise GenerationInputError(f"repetition_penalty must be > 0, found {self.repetition_penalty}")
        if self.temperature == 0 and (self.top_k != 0 or self.top_p != 1.0):
            raise GenerationInputError("top_k and top_p apply to sampling: give a temperature > 0 too (temperature 0 "
                                       "is greedy decoding, which they would not change)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits (b, V) float, seen (b, V) bool -> penalised float32 copy (unchanged where not seen)."""
    out = np.array(logits, dtype=np.float32)
    if penalty != 1.0:
        hit = out[seen]
        out[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out


def sample_row(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from logits (V,) with temperature, top-k and top-p; consumes exactly one draw of ``rng``."""
    x = logits.astype(np.float64) / cfg.temperature
    if 0 < cfg.top_k < x.size:
        idx = np.argpartition(x, -cfg.top_k)[-cfg.top_k:]
    else:
        idx = np.arange(x.size)
    vals = x[idx]
    if cfg.top_p < 1.0:
        order = np.argsort(-vals, kind="stable")
        idx, vals = idx[order], vals[order]
    p = np.exp(vals - vals.max())
    cdf = np.cumsum(p / p.sum())
    if cfg.top_p < 1.0:
        keep = int(np.searchsorted(cdf, cfg.top_p)) + 1
        idx, cdf = idx[:keep], cdf[:keep]
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(idx[min(j, idx.size - 1)])


def token_logprobs(logits: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The model's log-probability of ``tokens[j]`` in row ``rows[j]`` of logits (b, V): log softmax of the raw
    logits (before any repetition penalty, temperature, top-k or top-p), in float64."""
    x = np.asarray(logits[rows], dtype=np.float64)
    top = x.max(axis=-1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
    return x[np.arange(len(rows)), tokens] - lse


class Sampler:
    """Picks the next token of each of ``batch`` sequences and remembers which tokens each has seen."""

    def __init__(self, cfg: SamplingConfig, batch: int, vocab_size: int):
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.rngs = [np.random.default_rng([self.seed, i]) for i in range(batch)]
        self.seen = np.zeros((batch, vocab_size), dtype=bool) if cfg.repetition_penalty != 1.0 else None

    def observe(self, rows: np.ndarray | list[int], tokens: np.ndarray | list[int]) -> None:
        """Record that row ``rows[j]`` has seen token ``tokens[j]`` (only kept when a repetition penalty is on)."""
        if self.seen is not None:
            self.seen[np.asarray(rows, dtype=np.intp), np.asarray(tokens, dtype=np.intp)] = True

    def __call__(self, logits: np.ndarray, active: np.ndarray) -> np.ndarray:
        """logits (b, V), active (b,) bool -> next tokens (b,) int64; -1 for inactive rows (they draw nothing)."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.cfg.repetition_penalty)
        out = np.full(logits.shape[0], -1, dtype=np.int64)
        if self.cfg.greedy:
            out[active] = np.argmax(logits if active.all() else logits[active], axis=-1)
        else:
            for i in np.flatnonzero(active):
                out[i] = sample_row(logits[i], self.cfg, self.rngs[i])
        return out

    def rng_states(self) -> list[dict]:
        """JSON-able states of the per-row generators."""
        return [r.bit_generator.state for r in self.rngs]

    def set_rng_states(self, states: list[dict]) -> None:
        for r, s in zip(self.rngs, states, strict=True):
            r.bit_generator.state = s
