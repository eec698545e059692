"""The recurrent state of a batch on the device, and the two graphs that advance it.

Symbols: b batch, L n_layer, E d_inner, K d_conv, N d_state, V vocab_size, l prompt length.

Decode double-buffers the state: two sets of per-layer OrtValues (conv (b, E, K-1), ssm (b, E, N), float32) and two
IOBindings of decode.onnx built once, one reading set 0 and writing set 1, the other the reverse. A step copies the
new token ids into the ``input_ids`` OrtValue on the device (b int64 values), runs the binding that reads the current
set, and flips ``current``: no state crosses Python per token and nothing is allocated. Only the logits (b, V) come to
the host.

The ids live on the device, not in a host buffer bound once: onnxruntime copies a bound input that is not where its
consumer runs at bind time (IOBinding::BindInput), so a host buffer bound to a CUDA session would feed every step the
ids it held when it was bound.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def _state_names(n_layer: int, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}_conv.{i}", f"{prefix}_ssm.{i}") for i in range(n_layer)]


class DeviceState:
    """Per-layer state OrtValues of ``batch`` sequences, double-buffered, with decode.onnx bound to them.

    Args:
        session: the decode.onnx session.
        device: a :mod:`~mamba_runtime.device` device.
        shapes: (conv shape, ssm shape) of one layer for this batch.
        n_layer: L.
        logits_dtype: numpy dtype of decode.onnx's logits.
        vocab_size: V.
    """

    def __init__(self, session: ort.InferenceSession, device, shapes, n_layer: int, logits_dtype, vocab_size: int):
        self.session, self.device, self.n_layer = session, device, n_layer
        batch = shapes[0][0]
        self.sets = [[tuple(device.zeros(s, np.float32) for s in shapes) for _ in range(n_layer)] for _ in range(2)]
        self.ids = np.zeros((batch, 1), dtype=np.int64)
        self._ids_value = device.zeros((batch, 1), np.int64)  # on the device: see the module's docstring
        self._logits = device.zeros((batch, 1, vocab_size), logits_dtype)
        self.bindings = [self._bind(src) for src in (0, 1)]
        self.current = 0

    def _bind(self, src: int) -> ort.IOBinding:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._ids_value)
        binding.bind_ortvalue_output("logits", self._logits)
        names = zip(_state_names(self.n_layer, "past"), _state_names(self.n_layer, "present"))
        for (past, present), read, write in zip(names, self.sets[src], self.sets[1 - src]):
            for k in (0, 1):
                binding.bind_ortvalue_input(past[k], read[k])
                binding.bind_ortvalue_output(present[k], write[k])
        return binding

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per sequence: tokens (b,) int -> logits (b, V), a host view valid until the next step."""
        self.ids[:, 0] = tokens
        self.device.upload(self._ids_value, self.ids)
        self.session.run_with_iobinding(self.bindings[self.current])
        self.current ^= 1
        return self.device.to_host(self._logits)[:, 0]

    def download(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the current state: conv (L, b, E, K-1), ssm (L, b, E, N)."""
        layers = self.sets[self.current]
        return tuple(np.stack([np.array(self.device.to_host(layer[k])) for layer in layers]) for k in (0, 1))

    def upload(self, conv: np.ndarray, ssm: np.ndarray) -> None:
        """Make conv (L, b, E, K-1) and ssm (L, b, E, N) the current state."""
        for layer, c, s in zip(self.sets[self.current], conv, ssm, strict=True):
            self.device.upload(layer[0], np.ascontiguousarray(c, dtype=np.float32))
            self.device.upload(layer[1], np.ascontiguousarray(s, dtype=np.float32))


def _prefill_run(session: ort.InferenceSession, device, state: list[tuple], ids: np.ndarray):
    """Run ids (g, l) from ``state`` (per layer (conv, ssm) OrtValues); returns logits and the new state as
    OrtValues."""
    binding = session.io_binding()
    binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
    bound = ["logits"]
    binding.bind_output("logits", device.name)
    names = zip(_state_names(len(state), "past"), _state_names(len(state), "present"))
    for (past, present), values in zip(names, state):
        for k in (0, 1):
            binding.bind_ortvalue_input(past[k], values[k])
            binding.bind_output(present[k], device.name)
            bound.append(present[k])
    session.run_with_iobinding(binding)
    out = binding.get_outputs()  # in the order bound: logits, then (conv, ssm) per layer
    return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(len(state))]


def prefill(session: ort.InferenceSession, device, shapes, n_layer: int, ids: np.ndarray, chunk: int,
            start: tuple[np.ndarray, np.ndarray] | None = None):
    """Run g prompts of equal length from the start of a sequence (or from ``start``), at most ``chunk`` positions
    per graph run.

    Args:
        session: model_last.onnx or model.onnx.
        device: where the state and outputs are allocated.
        shapes: (conv shape, ssm shape) of one layer for batch g.
        n_layer: L.
        ids: (g, l) int64 token ids, l >= 1.
        chunk: the most positions per run (a long prompt runs in pieces, the state carried between them).
        start: host conv (L, g, E, K-1) and ssm (L, g, E, N) to run from instead of zeros (a sequence that goes on).

    Returns:
        logits of the last position (g, V), conv (L, g, E, K-1) and ssm (L, g, E, N), as host copies.
    """
    state = [tuple(device.zeros(s, np.float32) for s in shapes) for _ in range(n_layer)]
    if start is not None:
        for (c, s), c0, s0 in zip(state, *start, strict=True):
            device.upload(c, np.ascontiguousarray(c0, dtype=np.float32))
            device.upload(s, np.ascontiguousarray(s0, dtype=np.float32))
    for start in range(0, ids.shape[1], chunk):
        logits, state = _prefill_run(session, device, state, ids[:, start:start + chunk])
    conv = np.stack([np.array(device.to_host(c)) for c, _ in state])
    ssm = np.stack([np.array(device.to_host(s)) for _, s in state])
    return np.array(device.to_host(logits)[:, -1]), conv, ssm
