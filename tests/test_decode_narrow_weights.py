"""Narrow decode weights: the LinearF16W and LinearI8W ops of libmamba_export_ops, and exports with
``--decode-weights float16`` and ``--decode-weights int8``.

The ops: random float16 (int8 with float32 row scales) weights and float32 inputs of many shapes (K and N not
multiples of 8 or 16, one row of x or several, x of rank 1 to 3) against numpy in float64 on the very stored values,
with their model-local functions (what a stock onnxruntime runs) held to the same bound. Tolerance policy: the kernel
sums K products in float32 (16 running sums per row, a tree of 4 levels, a scalar tail of up to 15 terms, one add per
chunk of 512), so every sum is within (K/16 + 32) float32 rounding steps (2^-24) of sum |x_i w_i|; LinearI8W then
multiplies by the scale, one rounding more (2^-24 of the result); seen: far below.

The int8 quantization (``quantize_rows_int8``) is checked on its own: each stored value is the nearest multiple of
its row's scale, the scale is the row's largest magnitude over 127.

The exports ("tiny": tied LM head, with the library; "nondefault": biases, untied head, d_state 8), each with float16
and with int8 decode weights: decode.onnx with the narrow in_proj/out_proj/LM head, with the library and without it
(function fallback), after a prefill through model.onnx, against the float64 reference model whose in_proj, out_proj
and LM head weights were replaced by the values decode.onnx stores (float16: rounded to float16 and back; int8: the
int8 values times their row's scale; the embedding table keeps its float32 values, as decode.onnx's Gather does),
within 1e-4 relative over 64 steps: the float32 tolerance of the other export tests, since only the stored weights
differ and the reference has them too. Invalid inputs run in a subprocess, so a crash fails the test instead of
killing pytest.

Run as a script with --bad-cases to print the outcome of every invalid-input case (what the subprocess does).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from mamba_export import cli
from mamba_export.checkpoint import load_checkpoint
from mamba_export.export import ExportError, export_checkpoint, onnx_ops
from mamba_export.export.graphs import quantize_rows_int8
from mamba_runtime import custom_op_library_path
from support import (bad_case_tests, cli_refusal, library_built, make_hf_model, op_session, outcome_of, rel_err,
                     run_graph, save_transformers, zero_state)

DOMAIN = "ai.mamba_export"
ROOT = Path(__file__).resolve().parents[1]
# --decode-weights dtype -> (op, weights file, ONNX dtype of the stored matrices, bytes a weight)
NARROW = {"float16": ("LinearF16W", "decode_weights_f16.bin", TensorProto.FLOAT16, 2),
          "int8": ("LinearI8W", "decode_weights_i8.bin", TensorProto.INT8, 1)}
STEP_TOL = 1e-4  # decode logits against the reference with float16-rounded weights (see the module docstring)

pytestmark = pytest.mark.skipif(not library_built(),
                                reason="custom-op library not built (bash tools/build_custom_ops.sh)")


# ---- the ops alone ------------------------------------------------------------------------------------------------


def op_model(op: str = "LinearF16W", x_dtype=TensorProto.FLOAT, w_dtype=None, s_dtype=TensorProto.FLOAT,
             functions: bool = False) -> onnx.ModelProto:
    """One LinearF16W (X, W) or LinearI8W (X, W, S) node whose inputs are graph inputs of unknown shape, so that only
    the library checks shapes."""
    if w_dtype is None:
        w_dtype = TensorProto.INT8 if op == "LinearI8W" else TensorProto.FLOAT16
    names = ["X", "W", "S"] if op == "LinearI8W" else ["X", "W"]
    dtypes = {"X": x_dtype, "W": w_dtype, "S": s_dtype}
    inputs = [helper.make_tensor_value_info(n, dtypes[n], None) for n in names]
    node = helper.make_node(op, names, ["Y"], domain=DOMAIN)
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", onnx_ops.OPSET), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if functions:
        model.functions.extend(onnx_ops.model_functions())
    return model


_SESSIONS: dict[tuple[str, bool], ort.InferenceSession] = {}


def run_op(x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None, library: bool = True) -> np.ndarray:
    op = "LinearF16W" if scale is None else "LinearI8W"
    if (op, library) not in _SESSIONS:
        _SESSIONS[op, library] = op_session(op_model(op, functions=not library), library)
    feeds = {"X": x, "W": w} if scale is None else {"X": x, "W": w, "S": scale}
    return _SESSIONS[op, library].run(None, feeds)[0]


def random_case(seed: int, lead: tuple[int, ...], n: int, k: int, dtype: str = "float16"):
    """(x, w, scale): float16 weights and no scale, or int8 weights over their whole range and scales of 1e-3 to 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    if dtype == "float16":
        return x, (rng.standard_normal((n, k)) * k**-0.5).astype(np.float16), None
    w = rng.integers(-127, 128, (n, k), dtype=np.int8)
    return x, w, (10.0 ** rng.uniform(-3, 0, n)).astype(np.float32)


def check_against_float64(y: np.ndarray, x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None) -> None:
    """|y - s * (x @ w.T)| <= s * (K/16 + 32) * 2^-24 * (|x| @ |w|.T) (+ 2^-24 |y| for the scale's product), all in
    float64 on the stored weights' exact values; s = 1 for float16 weights."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    s64 = np.ones(w.shape[0]) if scale is None else scale.astype(np.float64)
    want = (x64 @ w64.T) * s64
    k = w.shape[1]
    bound = (k / 16 + 32) * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T) * s64
    if scale is not None:
        bound += 2.0**-24 * np.abs(want)
    assert y.dtype == np.float32 and y.shape == want.shape
    excess = np.abs(y - want) - bound
    assert excess.max() <= 0, f"worst error {np.abs(y - want).max():.3g} exceeds its bound by {excess.max():.3g}"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lead=st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple),
       n=st.integers(1, 300), k=st.integers(1, 1100), path=st.sampled_from(["library", "function"]),
       dtype=st.sampled_from(["float16", "int8"]))
def test_linear_narrow_matches_float64(seed, lead, n, k, path, dtype):
    x, w, scale = random_case(seed, lead, n, k, dtype)
    check_against_float64(run_op(x, w, scale, library=path == "library"), x, w, scale)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("path", ["library", "function"])
@pytest.mark.parametrize("lead,n,k", [((1, 1), 3072, 768), ((1, 1), 768, 1536), ((3, 1), 1000, 777),
                                      ((7,), 129, 1031), ((2, 5), 33, 16), ((1,), 1, 1), ((6, 1), 17, 513),
                                      ((16,), 1000, 777), ((2, 17), 31, 1040), ((19,), 2, 17)])
def test_linear_narrow_shapes(lead, n, k, path, dtype):
    """mamba-130m's in_proj and out_proj (several tasks, two chunks of K), batches of 3, 6, 7 and 10 rows (blocks of
    4 rows and remainders of 1 to 3), K one past a chunk, a single weight; 16, 19 and 34 rows (from 16 rows the AVX-512
    loops widen blocks of 15 weight rows and take 3 rows of a block a call: 31 rows leave 1, 2 rows leave 2) with K
    ending in 16 values (1040) or a scalar tail."""
    x, w, scale = random_case(n * k, lead, n, k, dtype)
    check_against_float64(run_op(x, w, scale, library=path == "library"), x, w, scale)


def test_linear_f16w_special_weights():
    """Subnormal, largest finite, negative zero and +-inf float16 weights widen exactly."""
    rng = np.random.default_rng(3)
    k = 40
    w = (rng.standard_normal((6, k)) * 0.1).astype(np.float16)
    w[0, :] = np.float16(6.0e-8)  # subnormals
    w[1, :5] = np.float16(65504.0)
    w[2, :] = np.float16(-0.0)
    w[3, 7] = np.float16(np.inf)
    w[4, 9] = -np.float16(np.inf)
    x = np.abs(rng.standard_normal((2, k))).astype(np.float32) + 0.5  # positive: inf * x stays inf
    y = run_op(x, w)
    assert np.isposinf(y[:, 3]).all() and np.isneginf(y[:, 4]).all()
    finite = [0, 1, 2, 5]
    check_against_float64(y[:, finite], x, w[finite])
    assert np.all(y[:, 0] > 0) and np.all(y[:, 2] == 0)


@pytest.mark.parametrize("path", ["library", "function"])
def test_linear_i8w_extreme_values(path):
    """-128 (which the exporter never stores) and 127 widen exactly; a zero scale zeroes its row, a negative one flips
    it; K = 8191 of +-127 sums exactly (every partial sum is an integer below 2^24)."""
    k = 8191
    w = np.full((4, k), 127, np.int8)
    w[1] = -128
    w[3, ::2] = -127
    x = np.ones((2, k), np.float32)
    scale = np.array([1.0, 0.5, 0.0, -2.0], np.float32)
    y = run_op(x, w, scale, library=path == "library")
    np.testing.assert_array_equal(y, np.tile(np.array([127.0 * k, -64.0 * k, 0.0, -2.0 * -127], np.float32), (2, 1)))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("k", [900, 1040])
def test_batch_rows_equal_single_rows_and_threads_do_not_matter(dtype, k):
    """Each output element is summed in the same order whatever the batch and the thread count: bit for bit. 9 rows
    of x run the weight rows one after the other (2 blocks of 4 rows of x and 1 more), 19 rows chunk by chunk against
    all of a task's rows (4 blocks and 3 more; with AVX-512 against blocks of the task's rows widened to float32);
    several tasks; 2 or 3 chunks of K, ending in a scalar tail (900) or in 16 values (1040)."""
    x, w, scale = random_case(5, (19,), 1000, k, dtype)
    batch = run_op(x, w, scale)
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(run_op(x[i:i + 1], w, scale), batch[i:i + 1])
    np.testing.assert_array_equal(run_op(x[:9], w, scale), batch[:9])
    op = "LinearF16W" if scale is None else "LinearI8W"
    feeds = {"X": x, "W": w} | ({} if scale is None else {"S": scale})
    one, three = (op_session(op_model(op), threads=t).run(None, feeds)[0] for t in (1, 3))
    np.testing.assert_array_equal(one, batch)
    np.testing.assert_array_equal(three, batch)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20), k=st.integers(1, 300),
       magnitude=st.sampled_from([1e-44, 1e-40, 1e-37, 1e-30, 1e-3, 1.0, 1e4, 1e36]))
def test_quantize_rows_int8_stores_the_nearest_multiple_of_the_row_scale(seed, n, k, magnitude):
    """Rows of ordinary, huge and tiny magnitudes (down to float32 subnormals, whose scale is held at the smallest
    normal float32), and an all-zero row."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((n, k)) * magnitude).to(torch.float32)
    w[rng.integers(0, n)] = 0.0  # an all-zero row
    q, scale = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape and scale.shape == (n,)
    w64, q64, s64 = w.double(), q.double(), scale.double()
    amax = w64.abs().amax(dim=1)
    zero = amax == 0
    assert torch.all(q[zero] == 0) and torch.all(scale[zero] == 1)
    # the scale: the row's largest magnitude over 127 rounded to float32, or the smallest normal float32
    tiny = torch.finfo(torch.float32).tiny
    want = (amax / 127).clamp(min=tiny)
    assert torch.allclose(s64[~zero], want[~zero], rtol=2**-23, atol=0) and torch.all(s64 >= tiny)
    normal = ~zero & (amax / 127 >= tiny)
    assert torch.all(q64.abs().amax(dim=1)[normal] == 127) and q.min() >= -127
    # the nearest multiple: |q s - w| <= s / 2 (and the float32 rounding of the scale at the largest weight)
    err = (q64 * s64[:, None] - w64).abs()
    assert torch.all(err <= s64[:, None] * (0.5 + 127 * 2**-24))


def test_quantize_rows_int8_refuses_non_finite_weights():
    w = torch.ones(3, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_rows_int8(w)


# ---- invalid inputs -------------------------------------------------------------------------------------------------

_X, _W, _Q, _S = np.ones((2, 1, 8), np.float32), np.ones((5, 8), np.float16), np.ones((5, 8), np.int8), np.ones(
    5, np.float32)
_F32, _F16, _I8, _F64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.DOUBLE
# name -> (op, feeds, declared X, W, S dtypes or None, strings the error must contain)
BAD_CASES = {
    "x_scalar": ("LinearF16W", (np.array(1.0, np.float32), _W), None, ["LinearF16W", "'X'", "rank 0", "[..., K]"]),
    "x_rank_9": ("LinearF16W", (np.ones((1,) * 8 + (8,), np.float32), _W), None, ["'X'", "rank 9"]),
    "w_rank_1": ("LinearF16W", (_X, np.ones(8, np.float16)), None, ["'W'", "rank 1", "[N, K]"]),
    "w_rank_3": ("LinearF16W", (_X, np.ones((1, 5, 8), np.float16)), None, ["'W'", "rank 3"]),
    "k_mismatch": ("LinearF16W", (_X, np.ones((5, 7), np.float16)), None, ["'X'", "[2, 1, 8]", "K=7"]),
    "empty_k": ("LinearF16W", (np.ones((2, 0), np.float32), np.ones((5, 0), np.float16)), None, ["'W'", "K = 0"]),
    "empty_n": ("LinearF16W", (_X, np.ones((0, 8), np.float16)), None, ["'W'", "N = 0"]),
    "empty_batch": ("LinearF16W", (np.ones((0, 1, 8), np.float32), _W), None, ["'X'", "leading dimension = 0"]),
    "w_float32": ("LinearF16W", (_X, np.ones((5, 8), np.float32)), (_F32, _F32, None), ["LinearF16W"]),
    "x_float16": ("LinearF16W", (_X.astype(np.float16), _W), (_F16, _F16, None), ["LinearF16W"]),
    "x_float64": ("LinearF16W", (_X.astype(np.float64), _W), (_F64, _F16, None), ["LinearF16W"]),
    "i8_x_scalar": ("LinearI8W", (np.array(1.0, np.float32), _Q, _S), None, ["LinearI8W", "'X'", "rank 0"]),
    "i8_w_rank_1": ("LinearI8W", (_X, np.ones(8, np.int8), _S), None, ["LinearI8W", "'W'", "rank 1", "[N, K]"]),
    "i8_k_mismatch": ("LinearI8W", (_X, np.ones((5, 7), np.int8), _S), None, ["'X'", "[2, 1, 8]", "K=7"]),
    "i8_x_rank_9": ("LinearI8W", (np.ones((1,) * 8 + (8,), np.float32), _Q, _S), None, ["'X'", "rank 9"]),
    "i8_empty_k": ("LinearI8W", (np.ones((2, 0), np.float32), np.ones((5, 0), np.int8), _S), None, ["'W'", "K = 0"]),
    "i8_empty_n": ("LinearI8W", (_X, np.ones((0, 8), np.int8), np.ones(0, np.float32)), None, ["'W'", "N = 0"]),
    "i8_empty_batch": ("LinearI8W", (np.ones((0, 1, 8), np.float32), _Q, _S), None, ["'X'", "leading dimension"]),
    "i8_scale_short": ("LinearI8W", (_X, _Q, np.ones(4, np.float32)), None, ["LinearI8W", "'S'", "N=5"]),
    "i8_scale_rank_2": ("LinearI8W", (_X, _Q, np.ones((5, 1), np.float32)), None, ["'S'", "shape [5, 1]", "[N=5]"]),
    "i8_scale_scalar": ("LinearI8W", (_X, _Q, np.array(1.0, np.float32)), None, ["'S'", "shape []", "[N=5]"]),
    "i8_w_uint8": ("LinearI8W", (_X, _Q.astype(np.uint8), _S), (_F32, TensorProto.UINT8, _F32), ["LinearI8W"]),
    "i8_w_float16": ("LinearI8W", (_X, _W, _S), (_F32, _F16, _F32), ["LinearI8W"]),
    "i8_scale_float16": ("LinearI8W", (_X, _Q, _S.astype(np.float16)), (_F32, _I8, _F16), ["LinearI8W"]),
}


def run_bad_case(name: str) -> dict:
    """Build and run one invalid case; report whether onnxruntime raised, and its message."""
    op, feeds, dtypes, _ = BAD_CASES[name]
    x_dtype, w_dtype, s_dtype = dtypes or (_F32, None, _F32)
    model = op_model(op, x_dtype=x_dtype, w_dtype=w_dtype, s_dtype=s_dtype or _F32)
    return outcome_of(lambda: op_session(model).run(None, dict(zip("XWS", feeds))))


(bad_case_outcomes, test_invalid_input_is_an_onnxruntime_error,
 test_bad_case_subprocess_exits_cleanly) = bad_case_tests(__file__, BAD_CASES, lambda case: case[3])


# ---- exports --------------------------------------------------------------------------------------------------------


def stored_reference(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy of ``model`` whose in_proj, out_proj and LM head weights hold what decode.onnx stores for them: rounded
    to float16 and back, or the int8 values times their row's scale; the embedding keeps its values (a tied LM head
    is untied)."""
    def stored(w: torch.Tensor) -> torch.nn.Parameter:
        if dtype == "float16":
            return torch.nn.Parameter(w.detach().to(torch.float16).to(w.dtype))
        q, scale = quantize_rows_int8(w.to(torch.float32))
        return torch.nn.Parameter(q.to(w.dtype) * scale.to(w.dtype)[:, None])

    ref = copy.deepcopy(model)
    for layer in ref.backbone.layers:
        layer.mixer.in_proj.weight = stored(layer.mixer.in_proj.weight)
        layer.mixer.out_proj.weight = stored(layer.mixer.out_proj.weight)
    ref.lm_head.weight = stored(ref.lm_head.weight)
    return ref


@pytest.fixture(scope="module", params=[("tiny", "float16"), ("nondefault", "float16"), ("tiny", "int8"),
                                        ("nondefault", "int8")], ids="-".join)
def exported(request, tmp_path_factory):
    """(config, decode weight dtype, export dir with those decode weights, float64 reference, the same with the
    stored weights). "tiny" ships the library and has model_last.onnx; "nondefault" neither."""
    config, dtype = request.param
    root = tmp_path_factory.mktemp(f"narrow-{config}-{dtype}")
    ckpt = save_transformers(make_hf_model(config, seed=1), root / "ckpt")
    tiny = config == "tiny"
    out = export_checkpoint(ckpt, root / "export", decode_weights=dtype, with_library=tiny, last_logits=tiny)
    ref = load_checkpoint(ckpt, dtype=torch.float64)
    return config, dtype, out, ref, stored_reference(ref, dtype)


def session(path: Path, how: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if how == "library":
        so.register_custom_ops_library(custom_op_library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("how", ["library", "function"])
def test_prefill_then_64_decode_steps_match_stored_reference(exported, how):
    """Prefill through model.onnx (float32 weights) then 64 steps of decode.onnx (narrow weights), batch 2."""
    _, _, out, ref, ref16 = exported
    prompt = 5
    ids = torch.randint(0, ref.config.vocab_size, (2, prompt + 64), generator=torch.Generator().manual_seed(1))
    logits, state = run_graph(session(out / "model.onnx", how), ids[:, :prompt], zero_state(ref.config, 2))
    decode = session(out / "decode.onnx", how)
    steps = []
    for t in range(prompt, ids.shape[1]):
        step_logits, state = run_graph(decode, ids[:, t:t + 1], state)
        steps.append(step_logits)
    got = np.concatenate(steps, axis=1)
    with torch.no_grad():
        want_prefill, ref_state = ref(ids[:, :prompt])
        state16, state32 = ref_state, ref_state
        want16, want32 = [], []
        for t in range(prompt, ids.shape[1]):
            l16, state16 = ref16.step(ids[:, t], state16)
            l32, state32 = ref.step(ids[:, t], state32)
            want16.append(l16[:, None])
            want32.append(l32[:, None])
    want16, want32 = torch.cat(want16, dim=1), torch.cat(want32, dim=1)
    assert rel_err(torch.from_numpy(logits), want_prefill) <= STEP_TOL
    assert rel_err(torch.from_numpy(got), want16) <= STEP_TOL
    assert rel_err(torch.from_numpy(got), want32) > STEP_TOL  # the tolerance tells stored from float32 weights


def graph_of(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=False).graph


def test_decode_graph_uses_the_narrow_op_and_its_own_weights_file(exported):
    _, dtype, out, ref, _ = exported
    op, narrow_file, narrow_type, width = NARROW[dtype]
    n_layer = ref.config.n_layer
    onnx_ops.register_schemas()
    onnx.checker.check_model(str(out / "decode.onnx"), full_check=True)
    decode = graph_of(out / "decode.onnx")
    ops = [(n.domain, n.op_type) for n in decode.node]
    assert ops.count((DOMAIN, op)) == 2 * n_layer + 1 and ("", "MatMul") not in ops
    assert ops.count((DOMAIN, "DecodeStep")) == n_layer and ops.count((DOMAIN, "AddRMSNorm")) == n_layer
    locations = {}
    for t in decode.initializer:
        where = {e.key: e.value for e in t.external_data}.get("location", "inline")
        locations.setdefault(t.data_type, set()).add(where)
    assert locations[narrow_type] == {narrow_file}
    matrices = [t for t in decode.initializer if t.data_type == narrow_type]
    assert len(matrices) == 2 * n_layer + 1  # in_proj, out_proj per layer, LM head (tied or not)
    scales = {n.input[2] for n in decode.node if n.op_type == "LinearI8W"}
    assert len(scales) == (len(matrices) if dtype == "int8" else 0)
    # the scales of 1 KiB or more are in the narrow file beside their matrices (weights.bin stays the float32
    # export's), the smaller ones inline
    scale_tensors = [t for t in decode.initializer if t.name in scales]
    assert len(scale_tensors) == len(scales)
    for t in scale_tensors:
        where = {e.key: e.value for e in t.external_data}.get("location", "inline")
        assert where == (narrow_file if 4 * int(np.prod(t.dims)) >= 1024 else "inline"), (t.name, where)
    in_file = [t for t in scale_tensors if t.external_data]
    stored = sum(width * int(np.prod(t.dims)) for t in matrices) + sum(4 * int(np.prod(t.dims)) for t in in_file)
    assert (out / narrow_file).stat().st_size >= stored
    for name in ("model.onnx", "model_last.onnx"):
        if (out / name).exists():
            graph = graph_of(out / name)
            assert all(n.op_type not in ("LinearF16W", "LinearI8W") for n in graph.node)
            assert all(t.data_type not in (TensorProto.FLOAT16, TensorProto.INT8) for t in graph.initializer)


def test_manifest_records_the_decode_weights(exported):
    _, dtype, out, _, _ = exported
    op, narrow_file, _, _ = NARROW[dtype]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode_weight_dtype"] == dtype and manifest["decode_weights_file"] == narrow_file
    assert manifest["dtype"] == "float32" and op in manifest["ops"]["names"]
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]


def _ops_that_ran(path: Path, how: str, tmp_path: Path) -> set[str]:
    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / f"profile_{how}")
    if how == "library":
        so.register_custom_ops_library(custom_op_library_path())
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.zeros((1, 1), np.int64)}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros([1, *i.shape[1:]], np.float32)
    sess.run(None, feeds)
    events = json.loads(open(sess.end_profiling()).read())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@pytest.mark.parametrize("how", ["library", "function"])
def test_library_kernel_runs_where_registered_function_elsewhere(exported, how, tmp_path):
    _, dtype, out, _, _ = exported
    ran = _ops_that_ran(out / "decode.onnx", how, tmp_path)
    if how == "library":
        assert {NARROW[dtype][0], "DecodeStep"} <= ran and "MatMul" not in ran
    else:
        assert "MatMul" in ran and not ran & set(onnx_ops.OP_NAMES)


def test_profile_floor_counts_the_narrow_matrix_weights(exported):
    """``mamba-export profile``'s memory floor: in_proj, out_proj and the LM head at 2 bytes a weight (float16) or 1
    and a float32 scale a row (int8); without the library (their functions run on folded float32 copies) at 4."""
    import dataclasses

    from mamba_runtime.manifest import open_export_dir
    from mamba_runtime.profiling import weight_bytes_per_token

    _, dtype, out, ref, _ = exported
    info = open_export_dir(out)
    as_float32 = dataclasses.replace(info, manifest={**info.manifest, "decode_weight_dtype": "float32"})
    c = ref.config
    matrices = c.n_layer * 3 * c.d_inner * c.d_model + c.vocab_size * c.d_model
    rows = c.n_layer * (2 * c.d_inner + c.d_model) + c.vocab_size
    saved = 2 * matrices if dtype == "float16" else 3 * matrices - 4 * rows
    assert weight_bytes_per_token(as_float32) - weight_bytes_per_token(info) == saved
    assert weight_bytes_per_token(info, library=False) == weight_bytes_per_token(as_float32)


@pytest.mark.parametrize("damage", ["one bit", "truncated", "missing"])
def test_a_damaged_narrow_weights_file_is_refused(exported, tmp_path, damage):
    """decode_weights_f16/i8.bin is checked against manifest.json like weights.bin (in a thread while the sessions
    load it): one bit changed, the file cut short or gone is refused with one line."""
    import shutil

    from mamba_runtime import ExportDirError, MambaRuntime

    _, dtype, out, _, _ = exported
    d = tmp_path / "export"
    shutil.copytree(out, d)
    narrow = d / NARROW[dtype][1]
    if damage == "one bit":
        data = bytearray(narrow.read_bytes())
        data[len(data) // 2] ^= 1
        narrow.write_bytes(bytes(data))
    elif damage == "truncated":
        os.truncate(narrow, 100)
    else:
        narrow.unlink()
    with pytest.raises(ExportDirError) as info:
        MambaRuntime(d, provider="cpu", threads=1, custom_ops="off")
    message = str(info.value)
    assert NARROW[dtype][1] in message and "\n" not in message
    assert ("missing" in message) if damage == "missing" else ("sha256 does not match manifest.json" in message)


def reference_greedy(ref, ref16, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens as the export computes them: prefill with the float32 weights, steps with the stored ones."""
    with torch.no_grad():
        logits, state = ref(torch.tensor([prompt]))
        tok = logits[:, -1].argmax(-1)
        out = [int(tok)]
        for _ in range(n - 1):
            logits, state = ref16.step(tok, state)
            tok = logits.argmax(-1)
            out.append(int(tok))
    return out


def test_python_runtime_runs_the_export(exported):
    from mamba_runtime import MambaRuntime

    config, _, out, ref, ref16 = exported
    prompt = [5, 17, 42, 7, 3]
    custom_ops = "require" if config == "tiny" else "off"
    rt = MambaRuntime(out, provider="cpu", threads=2, custom_ops=custom_ops)
    assert rt.generate(prompt, 16).tokens[0] == reference_greedy(ref, ref16, prompt, 16)


@pytest.mark.parametrize("exported", [("tiny", "float16"), ("tiny", "int8")], indirect=True, ids="-".join)
def test_cpp_runtime_runs_the_export(exported):
    _, _, out, ref, ref16 = exported
    proc = subprocess.run(["bash", "tools/build_cpp_runtime.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    binary = proc.stdout.strip().splitlines()[-1]
    prompt = [5, 17, 42, 7, 3]
    res = subprocess.run([binary, str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                          "--greedy"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert [int(t) for t in fields["tokens"].split(",")] == reference_greedy(ref, ref16, prompt, 12)


@pytest.mark.parametrize("exported", [("tiny", "int8")], indirect=True, ids="-".join)  # one export is enough
def test_onnxruntime_genai_runs_the_export(exported):
    og = pytest.importorskip("onnxruntime_genai")
    _, _, out, ref, _ = exported
    prompt = [5, 7, 9, 11]
    model = og.Model(str(out))  # genai runs model.onnx, whose weights stay float32
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    tokens = list(gen.get_sequence(0))[len(prompt):]
    assert tokens == ref.generate_greedy(torch.tensor([prompt]), len(tokens))[0].tolist()


# ---- the command line and its errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_transformers(make_hf_model("tiny"), tmp_path_factory.mktemp("narrow-cli") / "ckpt")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("flags,says", [
    (["--dtype", "float16"], "needs the float32 export"),
    (["--format", "torchscript"], "for ONNX exports only"),
    (["--decode-blocks", "on"], "DecodeBlock takes its matrices in the activation dtype"),
])
def test_cli_refuses_narrow_decode_weights_where_they_do_not_apply(ckpt, tmp_path, capsys, flags, says, dtype):
    line = cli_refusal(["export", str(ckpt), "-o", str(tmp_path / "out"), "--no-library", "--decode-weights",
                        dtype, *flags], capsys)
    assert line.startswith("mamba-export export: error: ") and f"--decode-weights {dtype}" in line and says in line
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_an_unknown_decode_weight_dtype(ckpt, tmp_path):
    with pytest.raises(ExportError, match="unknown decode weight dtype 'int4'"):
        export_checkpoint(ckpt, tmp_path / "o", decode_weights="int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_cli_export_with_narrow_decode_weights_keeps_the_float32_files(ckpt, tmp_path, capsys, dtype):
    """The prefill graphs and weights.bin are those of a plain float32 export, byte for byte; only decode.onnx and the
    new file differ."""
    plain, narrow = tmp_path / "plain", tmp_path / "narrow"
    assert cli.main(["export", str(ckpt), "-o", str(plain), "--no-library", "--last-logits"]) == 0
    assert cli.main(["export", str(ckpt), "-o", str(narrow), "--no-library", "--last-logits",
                     "--decode-weights", dtype]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(narrow)
    files = lambda d: json.loads((d / "manifest.json").read_text())["files"]  # noqa: E731
    a, b = files(plain), files(narrow)
    assert set(b) - set(a) == {NARROW[dtype][1]}
    assert all(a[name] == b[name] for name in ("weights.bin", "model.onnx", "model_last.onnx"))
    assert a["decode.onnx"] != b["decode.onnx"]
    assert json.loads((plain / "manifest.json").read_text())["decode_weight_dtype"] == "float32"


if __name__ == "__main__" and sys.argv[1:] == ["--bad-cases"]:
    for case in sorted(BAD_CASES):
        print(json.dumps({case: run_bad_case(case)}), flush=True)
