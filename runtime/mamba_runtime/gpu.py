"""CUDA specifics of the runtime: the CUDA device of :mod:`.device`, and a decode loop that keeps everything on the GPU.

Two ways to generate on a GPU (onnxruntime-gpu needed; CuPy for the second):

* ``MambaRuntime(export_dir, provider="cuda")`` uses :class:`CudaDevice` (below): the state lives on the GPU between
  steps through IOBinding, and the logits come to the host each step, where the runtime's sampler runs. Everything
  the runtime offers (uneven batches, top-k/top-p, snapshots) works.
* :class:`CudaGenerator` is the fast path: fixed device buffers for the token ids, the logits and a double-buffered
  state; greedy or temperature sampling with CuPy on the GPU writing straight into the next step's input ids, so only
  the sampled tokens (b int64) cross to the host; optionally each decode step replayed as a CUDA graph. onnxruntime
  runs on a CuPy stream of the generator's (provider option ``user_compute_stream``) and does not synchronise at the
  end of a run: the sampling kernels queue behind the step on the same stream, the argmax writes the tokens into
  pinned host memory too, and the host waits on an event. :meth:`CudaGenerator.steps` (and ``generate``) queue the
  next step before waiting for a step's tokens, so the GPU does not idle while the host takes them.

Why two CUDA graphs: onnxruntime replays a captured graph on the same device addresses, and the decode graph reads
the state set it does not write (reading and writing one buffer in place would race inside a step). So set 0 -> 1
and set 1 -> 0 are captured as two graphs (run option ``gpu_graph_id`` 0 and 1) and alternate.

Symbols: b batch, V vocab_size, L n_layer, E d_inner, K d_conv, N d_state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

from .errors import GenerationInputError, require_int
from .manifest import ExportInfo, WeightCheck, open_export_dir
from .sessions import check_ort_config, open_session, resolve_library, session_options

_NP_TO_ORT = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)"}


class CudaDevice:
    """onnxruntime's CUDA execution provider on GPU ``device_id``; OrtValues live in device memory.

    Used by :func:`mamba_runtime.device.select_device` for provider "cuda" (same four members as ``CpuDevice``).
    TF32 is off by default (``use_tf32`` "0"): onnxruntime's CUDA MatMuls otherwise round float32 operands to TF32,
    about 3e-4 relative error in the logits of a float32 export; float16 exports are unaffected.
    """

    name = "cuda"

    def __init__(self, device_id: int = 0, provider_options: dict | None = None):
        self.device_id = device_id
        self.provider_options = {"device_id": str(device_id), "use_tf32": "0", **(provider_options or {})}

    def providers(self) -> list:
        return [("CUDAExecutionProvider", self.provider_options), "CPUExecutionProvider"]

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), "cuda", self.device_id)

    def to_host(self, value: ort.OrtValue) -> np.ndarray:
        """A host copy of ``value``."""
        return value.numpy()

    def upload(self, value: ort.OrtValue, array: np.ndarray) -> None:
        """Copy ``array`` (same shape and dtype) into the device buffer of ``value``."""
        value.update_inplace(np.ascontiguousarray(array))


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise GenerationInputError(f"CudaGenerator needs CuPy (pip install cupy-cuda13x): {e}") from None
    return cupy


def cupy_view(value: ort.OrtValue):
    """A CuPy array on the device memory of an OrtValue (no copy; it keeps ``value`` alive)."""
    cp = _cupy()
    dtype = _ort_dtype(value)
    nbytes = int(np.prod(value.shape())) * dtype.itemsize
    mem = cp.cuda.UnownedMemory(value.data_ptr(), nbytes, value)
    return cp.ndarray(tuple(value.shape()), dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


# Row-wise argmax in one kernel: each block reduces a slice of a row to one 64-bit key (the value mapped to an
# order-preserving unsigned int in the high word, the complement of the index in the low word, so that the largest key
# is the first maximum, NaN above everything as in numpy) and counts itself done on the row's counter; the row's last
# block reduces the row's keys, writes the index and resets the counter. The maximum does not depend on the order, so
# neither does the result. CuPy's own argmax reduces each row in one block: 27 us for a 50,280-entry row on an H100; a
# second kernel for the keys cost a launch more on the stream.
_ARGMAX_SRC = r"""
#include <cuda_fp16.h>
typedef unsigned long long u64;
__device__ __forceinline__ float as_float(float v) { return v; }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
__device__ __forceinline__ u64 warp_max(u64 k) {
  for (int o = 16; o > 0; o /= 2) { u64 other = __shfl_xor_sync(0xffffffffu, k, o); k = other > k ? other : k; }
  return k;
}
__device__ __forceinline__ u64 block_max(u64 k) {
  __shared__ u64 s[32];
  k = warp_max(k);
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = k;
  __syncthreads();
  k = threadIdx.x < blockDim.x / 32 ? s[threadIdx.x] : 0ull;
  const u64 r = warp_max(k);
  __syncthreads();  // s may be written again
  return r;
}
template <typename T>
__global__ void argmax(const T* x, long long V, long long chunk, u64* keys, unsigned* done, long long* ids,
                       long long* host) {
  __shared__ bool last;
  const long long row = blockIdx.y, start = blockIdx.x * chunk;
  const long long end = start + chunk < V ? start + chunk : V;
  u64 best = 0ull;
  for (long long i0 = start + threadIdx.x; i0 < end; i0 += 4 * blockDim.x) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {  // the loads first, all in flight together
      const long long i = i0 + u * blockDim.x;
      v[u] = i < end ? as_float(x[row * V + i]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = i0 + u * blockDim.x;
      unsigned w = __float_as_uint(v[u]);
      w = (w & 0x80000000u) ? ~w : (w | 0x80000000u);
      const u64 key = (static_cast<u64>(w) << 32) | (0xffffffffu - static_cast<unsigned>(i));
      best = i < end && key > best ? key : best;
    }
  }
  best = block_max(best);
  if (threadIdx.x == 0) {
    keys[row * gridDim.x + blockIdx.x] = best;
    __threadfence();
    last = atomicAdd(done + row, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  best = 0ull;
  for (int i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    const u64 k = __ldcg(keys + row * gridDim.x + i);
    best = k > best ? k : best;
  }
  best = block_max(best);
  if (threadIdx.x == 0) {
    const long long id = 0xffffffffu - static_cast<unsigned>(best & 0xffffffffu);
    ids[row] = id;
    if (host != nullptr) host[row] = id;  // pinned host memory, mapped (unified addressing)
    done[row] = 0u;                       // ready for the next call (calls on one stream run one at a time)
  }
}
"""
_ARGMAX_THREADS, _ARGMAX_CHUNK = 256, 1024  # 4 values a thread: one load each, issued together


class _Argmax:
    """ids[r] = argmax(scores[r]) for a (b, V) float32 or float16 CuPy array, into int64 ids (b,) or (b, 1), and
    also into ``host`` (the address of b int64 in pinned host memory) when given: the tokens then reach the host
    without a copy on the stream (a copy engine's turn between two kernels costs the stream microseconds). Calls must
    not overlap (one stream): they share the per-row counters."""

    def __init__(self, cp, batch: int, vocab_size: int):
        self.cp = cp
        module = cp.RawModule(code=_ARGMAX_SRC, options=("-std=c++17",),
                              name_expressions=("argmax<float>", "argmax<__half>"))
        self.kernels = {np.dtype(np.float32): module.get_function("argmax<float>"),
                        np.dtype(np.float16): module.get_function("argmax<__half>")}
        self.batch, self.vocab = batch, vocab_size
        self.n_blocks = -(-vocab_size // _ARGMAX_CHUNK)
        self.keys = cp.empty((batch, self.n_blocks), dtype=cp.uint64)
        self.done = cp.zeros(batch, dtype=cp.uint32)

    def __call__(self, scores, ids, host: int = 0) -> None:
        cp = self.cp
        if scores.shape != (self.batch, self.vocab) or not scores.flags.c_contiguous or not ids.flags.c_contiguous:
            raise ValueError(f"argmax: expected contiguous ({self.batch}, {self.vocab}) scores")
        self.kernels[scores.dtype]((self.n_blocks, self.batch), (_ARGMAX_THREADS,),
                                   (scores, cp.int64(self.vocab), cp.int64(_ARGMAX_CHUNK), self.keys, self.done, ids,
                                    cp.uint64(host)))


def _ort_dtype(value: ort.OrtValue) -> np.dtype:
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    return np.dtype(types[value.data_type()])


class CudaGenerator:
    """Prefill and decode a batch with every per-token buffer on the GPU.

    Args:
        export_dir: an export directory (manifest checked like :class:`~mamba_runtime.MambaRuntime` does).
        batch: b, fixed for the life of the generator (the buffers and CUDA graphs are sized for it).
        cuda_graph: capture each decode step as a CUDA graph (two: one per state-buffer direction).
        device_id: the GPU.
        custom_ops: as for MambaRuntime ("auto", "require", "off").
        verify: check the export's checksums.
        ort_config: onnxruntime session config entries for both sessions, as for MambaRuntime.

    Example::

        gen = CudaGenerator("out/", batch=8, cuda_graph=True)
        tokens = gen.generate(prompts, 64)          # (8, 64) int64 on the host; greedy
    """

    def __init__(self, export_dir: str | Path, batch: int, *, cuda_graph: bool = False, device_id: int = 0,
                 custom_ops: str = "auto", verify: bool = True, ort_config: Mapping[str, str] | None = None):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GenerationInputError("CudaGenerator: this onnxruntime has no CUDAExecutionProvider")
        require_int(batch, "batch")
        self.ort_config = check_ort_config(ort_config)
        self.cp = _cupy()
        self.info: ExportInfo = open_export_dir(export_dir, verify, weights_later=True)
        self.batch, self.cuda_graph, self.device_id = batch, cuda_graph, device_id
        self.library = resolve_library(self.info, custom_ops)
        with self.cp.cuda.Device(device_id):
            self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.device = CudaDevice(device_id, {"user_compute_stream": str(self.stream.ptr)})
        with WeightCheck(self.info, verify):  # the weight files' sha256, while onnxruntime loads them
            self.prefill_session = self._session(self.info.prefill_graph, graph=False)
            self.decode_session = self._session("decode.onnx", graph=cuda_graph)
        logits_type = next(o.type for o in self.decode_session.get_outputs() if o.name == "logits")
        self.logits_dtype = next(np.dtype(d) for d, t in _NP_TO_ORT.items() if t == logits_type)
        b, V = batch, self.info.vocab_size
        # Fixed device buffers: ids (b, 1) int64, logits (b, 1, V), two state sets of L x (conv, ssm).
        self._ids = self.device.zeros((b, 1), np.int64)
        self._logits = self.device.zeros((b, 1, V), self.logits_dtype)
        shapes = self.info.state_shapes(b)
        self.sets = [[tuple(self.device.zeros(s, np.float32) for s in shapes) for _ in range(self.info.n_layer)]
                     for _ in range(2)]
        self.ids = cupy_view(self._ids)
        self.logits = cupy_view(self._logits)
        self.bindings = [self._bind_decode(src) for src in (0, 1)]
        self.run_options = []
        for src in (0, 1):
            ro = self._run_options()
            if cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(src))
            self.run_options.append(ro)
        self.current = 0
        self.temperature = 0.0
        with self.stream:
            self._rng = self.cp.random.default_rng(0)
            self._argmax = _Argmax(self.cp, b, V)
        self._step_row = self._token_rows(1)  # step()'s tokens

    @staticmethod
    def _run_options() -> ort.RunOptions:
        """No synchronisation at the end of a run: what follows on the generator's stream waits for it anyway."""
        ro = ort.RunOptions()
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return ro

    def _session(self, name: str, graph: bool) -> ort.InferenceSession:
        so = session_options(None, self.library, config=self.ort_config)
        opts = {**self.device.provider_options, "enable_cuda_graph": "1" if graph else "0"}
        return open_session(self.info.path / name, so, [("CUDAExecutionProvider", opts), "CPUExecutionProvider"])

    def _state_names(self, prefix: str):
        return [(f"{prefix}_conv.{i}", f"{prefix}_ssm.{i}") for i in range(self.info.n_layer)]

    def _bind_decode(self, src: int) -> ort.IOBinding:
        binding = self.decode_session.io_binding()
        binding.bind_ortvalue_input("input_ids", self._ids)
        binding.bind_ortvalue_output("logits", self._logits)
        for past, present, read, write in zip(self._state_names("past"), self._state_names("present"),
                                              self.sets[src], self.sets[1 - src]):
            for k in (0, 1):
                binding.bind_ortvalue_input(past[k], read[k])
                binding.bind_ortvalue_output(present[k], write[k])
        return binding

    # ---- sampling on the GPU ------------------------------------------------------------------------------------
    def _sample_into_ids(self, logits, host: int = 0) -> None:
        """logits (b, V) on the device -> next ids (b, 1) on the device (and at ``host``, pinned host memory, when
        given): argmax, or Gumbel-max at temperature T."""
        cp = self.cp
        with self.stream:
            if self.temperature > 0:
                u = self._rng.random(size=logits.shape, dtype=cp.float32)
                gumbel = -cp.log(-cp.log(cp.clip(u, 1e-12, 1.0 - 1e-7)))
                scores = logits.astype(cp.float32) / self.temperature + gumbel
            else:
                scores = cp.ascontiguousarray(logits)
            self._argmax(scores, self.ids, host)

    # ---- generation ---------------------------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], temperature: float = 0.0, seed: int = 0) -> np.ndarray:
        """Run each prompt from a zero state, writing its final state straight into this batch's row of the current
        state set (no copy), and sample the first token on the GPU. Returns the first tokens (b,) on the host."""
        if len(prompts) != self.batch:
            raise GenerationInputError(f"expected {self.batch} prompts, found {len(prompts)}")
        if temperature < 0:
            raise GenerationInputError(f"temperature must be >= 0, found {temperature}")
        self.temperature = float(temperature)
        self._rng = self.cp.random.default_rng(seed)
        self.current = 0
        zeros = [tuple(self.device.zeros(s, np.float32) for s in self.info.state_shapes(1))
                 for _ in range(self.info.n_layer)]
        with self.stream:
            last = self.cp.empty((self.batch, self.info.vocab_size), dtype=self.logits_dtype)
        for row, ids in enumerate(prompts):
            if len(ids) == 0:
                raise GenerationInputError(f"prompt {row} is empty")
            binding = self.prefill_session.io_binding()
            binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
            binding.bind_output("logits", "cuda", self.device_id)
            for past, present, zero, dest in zip(self._state_names("past"), self._state_names("present"), zeros,
                                                 self.sets[0]):
                for k in (0, 1):
                    binding.bind_ortvalue_input(past[k], zero[k])
                    shape = dest[k].shape()
                    row_bytes = int(np.prod(shape[1:])) * 4
                    binding.bind_output(present[k], "cuda", self.device_id, np.float32, [1, *shape[1:]],
                                        dest[k].data_ptr() + row * row_bytes)
            self.prefill_session.run_with_iobinding(binding, self._run_options())
            logits = cupy_view(binding.get_outputs()[0])
            with self.stream:
                last[row] = logits[0, -1]
        self._sample_into_ids(last)
        return self.cp.asnumpy(self.ids[:, 0], stream=self.stream)

    def _token_rows(self, rows: int) -> tuple[np.ndarray, list]:
        """``rows`` rows of b int64 in pinned host memory (CuPy's pinned pool), and an event per row."""
        memory = self.cp.cuda.alloc_pinned_memory(8 * self.batch * rows)
        ring = np.frombuffer(memory, dtype=np.int64, count=self.batch * rows).reshape(rows, self.batch)
        return ring, [self.cp.cuda.Event(block=False, disable_timing=True) for _ in range(rows)]

    def _enqueue_step(self, host_row: np.ndarray, event) -> None:
        """Queue one decode step on the generator's stream: decode.onnx on the last sampled ids (onnxruntime returns
        once the step is queued: a graph replay, or the kernels launched), the sampling into the ids and into
        ``host_row`` (pinned host memory), then ``event``."""
        self.decode_session.run_with_iobinding(self.bindings[self.current], self.run_options[self.current])
        self.current ^= 1
        self._sample_into_ids(self.logits[:, 0], host_row.ctypes.data)
        event.record(self.stream)

    def step(self) -> np.ndarray:
        """Feed the last sampled tokens, run decode.onnx (a CUDA graph replay when enabled), sample the next on the
        GPU. Returns the new tokens (b,) int64 on the host (the sampling kernel writes them to pinned host memory:
        no copy on the stream); the host waits for the step, so the GPU idles while the host prepares the next one
        (:meth:`steps` does not)."""
        (row,), (event,) = self._step_row
        self._enqueue_step(row, event)
        event.synchronize()
        return row.copy()

    def steps(self, n: int, lookahead: int = 1) -> Iterator[np.ndarray]:
        """Decode ``n`` steps, yielding each step's tokens (b,) int64 on the host, with up to ``lookahead`` further
        steps already queued on the GPU while the host handles a step's tokens.

        Same tokens as ``n`` calls of :meth:`step`, but the GPU never waits for the host: the next step's input ids
        are already on the device (the sampling writes them), so step i+1 is queued before step i's tokens are read
        (the sampling kernel writes each step's tokens to a row of pinned host memory, with an event to wait on). The
        time per token is then the GPU's alone (the host's share of a step, ~25 us, runs beside it). Leaving the loop
        early (``break``) still leaves the queued steps run: the state is then up to ``lookahead`` steps further on
        than the last tokens read (:meth:`state` says where it is).
        """
        return self._steps(require_int(n, "n", 0), require_int(lookahead, "lookahead", 0))

    def _steps(self, n: int, lookahead: int) -> Iterator[np.ndarray]:
        slots = lookahead + 1
        ring, events = self._token_rows(slots)
        queued = 0
        for i in range(n):
            while queued < min(n, i + 1 + lookahead):  # the row of step j is j % slots, read before it is reused
                self._enqueue_step(ring[queued % slots], events[queued % slots])
                queued += 1
            events[i % slots].synchronize()
            yield ring[i % slots].copy()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> np.ndarray:
        """Prefill then decode: (b, max_new_tokens) int64 tokens (greedy when temperature is 0), the decode steps
        queued ahead of the host as in :meth:`steps`."""
        require_int(max_new_tokens, "max_new_tokens")
        out = [self.prefill(prompts, temperature, seed)]
        out.extend(self.steps(max_new_tokens - 1, lookahead=2))
        return np.stack(out, axis=1)

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the current state: conv (L, b, E, K-1), ssm (L, b, E, N)."""
        layers = self.sets[self.current]
        self.stream.synchronize()  # OrtValue.numpy() copies on the legacy stream, which does not wait for ours
        return tuple(np.stack([layer[k].numpy() for layer in layers]) for k in (0, 1))
