"""onnxruntime sessions for an export directory: options, threads, the custom-op library, I/O checks."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ExportDirError, GenerationInputError, MambaExportError, require_int
from .library import custom_op_library_path, env_library
from .manifest import ExportInfo

CUSTOM_OPS_MODES = ("auto", "require", "off")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class CustomOpsFallbackWarning(UserWarning):
    """The custom-op library is not used: the ops run as their (slower) ONNX-function fallbacks in the graphs."""


class CpuPlacementWarning(UserWarning):
    """Under a GPU provider, onnxruntime placed compute nodes of a graph on the CPU (each one costs copies between
    the devices and runs at CPU speed). :func:`cpu_placed_nodes` lists them."""


# Nodes that do a graph's arithmetic: the project's custom ops (any op of the domain) and these standard ones. Other
# nodes onnxruntime puts on the CPU on purpose (the small int64 shape computations: Shape, Gather and Concat of
# shapes, ...), so they are not reported.
_CUSTOM_DOMAIN = "ai.mamba_export"
_COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "Loop", "Scan", "Softmax", "LayerNormalization",
                "SimplifiedLayerNormalization"}
_ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


def resolve_library(info: ExportInfo, mode: str) -> str | None:
    """Path of the custom-op library to register, or None to run the graphs' function fallbacks.

    ``mode``: "auto" (the export's copy, else the package's build, else the fallback with a
    :class:`CustomOpsFallbackWarning`), "require" (an error instead of the fallback), "off" (always the fallback).
    Unless "off", a ``$MAMBA_EXPORT_OPS_LIBRARY`` that names no file is an error.
    """
    if mode not in CUSTOM_OPS_MODES:
        raise GenerationInputError(f"custom_ops must be one of {', '.join(CUSTOM_OPS_MODES)}; found {mode!r}")
    if mode == "off":
        return None
    env_library()  # $MAMBA_EXPORT_OPS_LIBRARY naming no file is an error (not a silent fallback), also here
    if info.library is not None:
        return str(info.path / info.library)
    try:
        return custom_op_library_path()
    except MambaExportError as e:  # not built
        if mode == "require":
            raise ExportDirError(f"{info.path}: the export ships no custom-op library and {e}") from None
        warnings.warn(f"{info.path}: no custom-op library in the export or the package; running the ONNX-function "
                      "fallbacks of the custom ops (same results, slower)", CustomOpsFallbackWarning, stacklevel=3)
        return None


def check_ort_config(config) -> dict[str, str]:
    """``config`` (None or a mapping of onnxruntime session config keys to values, both strings) as a dict."""
    if config is None:
        return {}
    if not isinstance(config, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in
                                                  config.items()):
        raise GenerationInputError("ort_config must map onnxruntime session config keys to values, both strings "
                                   "(e.g. {'session.disable_prepacking': '1'})")
    return dict(config)


def session_options(threads: int | None, library: str | None, profile_prefix: str | None = None,
                    config: Mapping[str, str] | None = None):
    """SessionOptions: ``threads`` intra-op threads (None: onnxruntime's default), one inter-op thread, full graph
    optimisation, the library registered, onnxruntime's profiler on when ``profile_prefix`` is given, and the session
    config entries of ``config`` (checked by check_ort_config where the caller took them; passed through unchecked to
    onnxruntime, as the C++ runtime's ort_config)."""
    so = ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if threads is not None:
        so.intra_op_num_threads = require_int(threads, "threads")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # FATAL only: a graph onnxruntime cannot load would first print its multi-line, coloured ERROR log, then our
    # one-line error, which carries onnxruntime's message (see ort_message). Warnings are not shown at all.
    so.log_severity_level = 4
    if library is not None:
        try:
            so.register_custom_ops_library(library)
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
            raise ExportDirError(f"{library}: cannot load the custom-op library ({ort_message(e)}); "
                                 "run without it with custom_ops='off' (--no-custom-ops)") from None
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


_ORT_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


def ort_message(error: Exception) -> str:
    """onnxruntime's message in one line: its first line, from its innermost status on (a nested status repeats
    '[ONNXRuntimeError] : 1 : FAIL : ' after the C++ signature of the function that rethrew it)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    return _ORT_STATUS.split(first)[-1].strip() or first


def _provider_names(providers: list) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def open_session(path: Path, so, providers: list) -> ort.InferenceSession:
    """An InferenceSession of ``path``; a graph onnxruntime cannot load is an :class:`ExportDirError`. Under a GPU
    provider, compute nodes placed on the CPU are reported with a :class:`CpuPlacementWarning`."""
    gpu = _provider_names(providers)[0] != "CPUExecutionProvider"
    if gpu:
        so.add_session_config_entry(_ASSIGNMENT_KEY, "1")
    try:
        session = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime's InvalidGraph, Fail, NoSuchFile ... share no public base class
        raise ExportDirError(f"{path}: onnxruntime cannot load it ({ort_message(e)})") from None
    if gpu:
        warn_cpu_placement(session, path)
    return session


def cpu_placed_nodes(session: ort.InferenceSession) -> list[tuple[str, str]] | None:
    """(op type, node name) of the compute nodes onnxruntime placed on the CPU execution provider; None when this
    onnxruntime cannot say (no ``get_provider_graph_assignment_info``, or the session was made without the option
    ``session.record_ep_graph_assignment_info``)."""
    try:
        groups = session.get_provider_graph_assignment_info()
    except Exception:  # an older onnxruntime (AttributeError) or the option not set (its own error type)
        return None
    return compute_nodes_on_cpu((g.ep_name, [(n.domain, n.op_type, n.name) for n in g.get_nodes()]) for g in groups)


def compute_nodes_on_cpu(groups) -> list[tuple[str, str]]:
    """From (execution provider, [(domain, op type, node name)]) groups: the compute nodes on the CPU provider."""
    out = []
    for ep, nodes in groups:
        if ep != "CPUExecutionProvider":
            continue
        out += [(op, name) for domain, op, name in nodes if domain == _CUSTOM_DOMAIN or op in _COMPUTE_OPS]
    return sorted(out)


def warn_cpu_placement(session: ort.InferenceSession, path: Path) -> None:
    nodes = cpu_placed_nodes(session)
    if nodes:
        counts: dict[str, int] = {}
        for op, _ in nodes:
            counts[op] = counts.get(op, 0) + 1
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items()))
        warnings.warn(f"{path}: onnxruntime placed {len(nodes)} compute nodes on the CPU under "
                      f"{session.get_providers()[0]} ({ops}): they run at CPU speed with copies between the devices",
                      CpuPlacementWarning, stacklevel=3)


def check_io(session: ort.InferenceSession, info: ExportInfo, name: str) -> np.dtype:
    """Check a graph's I/O names against the contract; return the numpy dtype of its logits."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    per_kind = 1 + 2 * info.n_layer
    if len(got_in) != per_kind or len(got_out) != per_kind:  # counted before 2 n_layer state names are made
        raise ExportDirError(f"{info.path / name}: {len(got_in)} inputs and {len(got_out)} outputs, but "
                             f"manifest.json's n_layer {info.n_layer} makes {per_kind} of each")
    want_in = ["input_ids"] + [f"past_{k}.{i}" for i in range(info.n_layer) for k in ("conv", "ssm")]
    want_out = ["logits"] + [f"present_{k}.{i}" for i in range(info.n_layer) for k in ("conv", "ssm")]
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise ExportDirError(f"{info.path / name}: graph inputs/outputs {got_in} -> {got_out} do not follow the "
                             f"contract for {info.n_layer} layers")
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    if logits.type not in _ORT_TYPES:
        raise ExportDirError(f"{info.path / name}: logits of type {logits.type} are not supported by this runtime")
    vocab = logits.shape[-1] if logits.shape else None
    if isinstance(vocab, int) and vocab != info.vocab_size:
        raise ExportDirError(f"{info.path / name}: logits over {vocab} tokens, but manifest.json says vocab_size "
                             f"{info.vocab_size}")
    states = {i.name: i.shape for i in session.get_inputs()}
    for kind, shape in zip(("conv", "ssm"), info.state_shapes(1)):
        got = states[f"past_{kind}.0"]
        if len(got) != len(shape) or any(isinstance(g, int) and g != w for g, w in zip(got[1:], shape[1:])):
            raise ExportDirError(f"{info.path / name}: past_{kind}.0 has shape {got}, but manifest.json's sizes give "
                                 f"(batch, {', '.join(map(str, shape[1:]))})")
    return np.dtype(_ORT_TYPES[logits.type])
