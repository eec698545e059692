"""The CPU custom ops of libmamba_export_ops (SelectiveScan, CausalConv1d, DecodeStep, RMSNorm, AddRMSNorm) against
the float64 references.

Each op runs as a single-node ONNX model in onnxruntime with the library registered. Inputs are random (hypothesis
draws the shapes and a seed), in float32 or float16; the references in :mod:`mamba_export.ops` (and
``MambaMixer.step`` for DecodeStep) run in float64 on the very values the op saw. Tolerances, relative to the element
and to the largest reference value: float32 results 2e-6 (about 16 float32 rounding steps; seen: up to 4e-7),
float16 results 1e-3 (twice the float16 rounding step 2^-11); states are float32 in both cases (1e-6). Invalid inputs must give an onnxruntime error
naming the op and the input; they run in a subprocess, so a crash fails the test instead of killing pytest.
The norms' model-local ONNX functions (what a stock onnxruntime runs) are held to the same references.

Run as a script with --bad-cases to print the outcome of every invalid-input case, or with --too-old-onnxruntime to
register the library against an onnxruntime without API version 21 (what the subprocesses do).
"""

from __future__ import annotations

import ctypes
import functools
import json
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

from mamba_export.backends import REFERENCE
from mamba_export.config import MambaConfig
from mamba_export.export import onnx_ops
from mamba_export.ops import causal_conv1d_ref, selective_scan_ref
from support import bad_case_tests, float64_mixer, op_session, outcome_of
from mamba_runtime import custom_op_library_path

DOMAIN = "ai.mamba_export"
ONNX_DTYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}
TOL = {np.float32: 2e-6, np.float16: 1e-3}
STATE_TOL = 1e-6

# (name, "T" for the activation dtype, "R" for the residual dtype, or a fixed numpy dtype) of every input and output,
# in contract order.
SIGNATURES = {
    "SelectiveScan": (
        [("u", "T"), ("delta", "T"), ("A", np.float32), ("B", "T"), ("C", "T"), ("D", np.float32), ("z", "T"),
         ("delta_bias", np.float32), ("ssm_state_in", np.float32)],
        [("y", "T"), ("ssm_state_out", np.float32)],
    ),
    "CausalConv1d": (
        [("x", "T"), ("conv_state_in", np.float32), ("weight", np.float32), ("bias", np.float32)],
        [("y", "T"), ("conv_state_out", np.float32)],
    ),
    "DecodeStep": (
        [("xz", "T"), ("conv_state_in", np.float32), ("ssm_state_in", np.float32), ("conv_weight", np.float32),
         ("conv_bias", np.float32), ("x_proj_weight", np.float32), ("dt_proj_weight", np.float32),
         ("dt_bias", np.float32), ("A", np.float32), ("D", np.float32)],
        [("y", "T"), ("conv_state_out", np.float32), ("ssm_state_out", np.float32)],
    ),
    "RMSNorm": ([("x", "R"), ("weight", "T")], [("y", "T")]),
    "AddRMSNorm": ([("x", "T"), ("residual", "R"), ("weight", "T")], [("y", "T"), ("residual_out", "R")]),
}


def single_node_model(op: str, dtype, attrs: dict, input_dtypes: dict | None = None, rdtype=np.float32,
                      functions: bool = False) -> onnx.ModelProto:
    """One `op` node whose inputs and outputs are graph I/O of unknown shape, so that only the library checks shapes.

    ``input_dtypes`` overrides the declared dtype of some inputs (to build invalid models); ``rdtype`` is the
    residual dtype R of the norms; ``functions`` attaches the model-local fallback functions of the exported graphs.
    """
    ins, outs = SIGNATURES[op]
    declared = lambda kind: ONNX_DTYPE[dtype if kind == "T" else rdtype if kind == "R" else kind]  # noqa: E731
    overrides = input_dtypes or {}
    inputs = [helper.make_tensor_value_info(n, ONNX_DTYPE[overrides[n]] if n in overrides else declared(k), None)
              for n, k in ins]
    outputs = [helper.make_tensor_value_info(n, declared(k), None) for n, k in outs]
    node = helper.make_node(op, [n for n, _ in ins], [n for n, _ in outs], domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], op, inputs, outputs)
    opsets = [helper.make_opsetid("", onnx_ops.OPSET if functions else 17), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if functions:
        model.functions.extend(onnx_ops.model_functions())
    return model


@functools.lru_cache(maxsize=None)
def cached_session(op: str, dtype, attr_items: tuple, rdtype=np.float32, library: bool = True) -> ort.InferenceSession:
    model = single_node_model(op, dtype, dict(attr_items), rdtype=rdtype, functions=not library)
    return op_session(model, library)


def run_op(op: str, dtype, feeds: dict, rdtype=np.float32, library: bool = True, **attrs) -> list[np.ndarray]:
    """Run `op` once; ``library=False`` runs its model-local function in a stock onnxruntime instead."""
    return cached_session(op, dtype, tuple(sorted(attrs.items())), rdtype, library).run(None, feeds)


def f64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64))


def assert_close(out: np.ndarray, ref, tol: float) -> None:
    """|out - ref| <= tol * (|ref| + max(1, max |ref|)) elementwise."""
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol * scale)


class Inputs:
    """Random inputs of a seeded case: activations in the case's dtype, parameters and states in float32."""

    def __init__(self, seed: int, dtype):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype

    def act(self, *shape, scale=1.0) -> np.ndarray:
        return (scale * self.rng.standard_normal(shape)).astype(np.float32).astype(self.dtype)

    def f32(self, *shape, scale=1.0) -> np.ndarray:
        return (scale * self.rng.standard_normal(shape)).astype(np.float32)

    def negative_A(self, e: int, n: int) -> np.ndarray:
        return -np.exp(self.rng.uniform(-1.0, 1.5, (e, n))).astype(np.float32)


# ---- SelectiveScan ------------------------------------------------------------------------------------------------


def scan_feeds(seed: int, dtype, b: int, l: int, e: int, n: int, softplus: bool) -> dict:
    g = Inputs(seed, dtype)
    delta = g.act(b, l, e) if softplus else np.abs(g.act(b, l, e, scale=0.5))  # without softplus: dt > 0 given
    return dict(u=g.act(b, l, e), delta=delta, A=g.negative_A(e, n), B=g.act(b, l, n), C=g.act(b, l, n),
                D=g.f32(e), z=g.act(b, l, e), delta_bias=g.f32(e, scale=0.5) if softplus else np.zeros(e, np.float32),
                ssm_state_in=g.f32(b, e, n))


def scan_reference(feeds: dict, softplus: bool):
    """selective_scan_ref in float64, with the contract's channels-last layout transposed to the reference's."""
    t = {k: f64(v) for k, v in feeds.items()}
    cl = lambda x: x.transpose(1, 2)  # noqa: E731  [b, l, c] <-> [b, c, l]
    y, h = selective_scan_ref(cl(t["u"]), cl(t["delta"]), t["A"], cl(t["B"]), cl(t["C"]), t["D"], cl(t["z"]),
                              t["delta_bias"], softplus, t["ssm_state_in"])
    return cl(y), h


def check_scan(seed, dtype, b, l, e, n, softplus):
    feeds = scan_feeds(seed, dtype, b, l, e, n, softplus)
    y, state = run_op("SelectiveScan", dtype, feeds, delta_softplus=int(softplus))
    y_ref, state_ref = scan_reference(feeds, softplus)
    assert y.dtype == dtype and y.shape == (b, l, e) and state.dtype == np.float32 and state.shape == (b, e, n)
    assert_close(y, y_ref, TOL[dtype])
    assert_close(state, state_ref, STATE_TOL)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float16]), b=st.integers(1, 3),
       l=st.integers(1, 40), e=st.integers(1, 70), n=st.integers(1, 17), softplus=st.booleans())
def test_selective_scan_matches_reference(seed, dtype, b, l, e, n, softplus):
    check_scan(seed, dtype, b, l, e, n, softplus)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_selective_scan_long_sequence(dtype):
    check_scan(7, dtype, b=1, l=2048, e=40, n=16, softplus=True)


def test_selective_scan_extreme_values():
    """softplus past its threshold of 20, SiLU of large |z|, exp(dt A) underflowing to 0: still the reference."""
    b, l, e, n = 2, 16, 70, 8
    feeds = scan_feeds(9, np.float32, b, l, e, n, softplus=True)
    rng = np.random.default_rng(9)
    feeds["delta"] = rng.uniform(-40, 40, (b, l, e)).astype(np.float32)
    feeds["z"] = rng.uniform(-100, 100, (b, l, e)).astype(np.float32)
    feeds["A"] = -np.exp(rng.uniform(-3, 7, (e, n))).astype(np.float32)
    y, state = run_op("SelectiveScan", np.float32, feeds, delta_softplus=1)
    y_ref, state_ref = scan_reference(feeds, True)
    assert_close(y, y_ref, TOL[np.float32])
    assert_close(state, state_ref, STATE_TOL)


def test_exp_overflows_to_infinity_not_to_a_finite_value():
    """Without softplus a negative delta makes dt A positive, and the state grows as exp(dt A): correct up to the
    largest float (exp(88.6) = 3.0e38) and infinite beyond, as numpy's float32 exp; SiLU of a huge negative value
    is -0 (it used to divide by a saturated exp and give about -0.4)."""
    b, l, e, n = 1, 1, 3, 1
    feeds = scan_feeds(1, np.float32, b, l, e, n, softplus=False)
    feeds.update(u=np.zeros((b, l, e), np.float32), delta=np.array([[[-88.6, -100.0, -50.0]]], np.float32),
                 delta_bias=np.zeros(e, np.float32), A=-np.ones((e, n), np.float32),
                 ssm_state_in=np.ones((b, e, n), np.float32), z=np.zeros((b, l, e), np.float32))
    for path in ("library", "function"):
        _, state = run_op("SelectiveScan", np.float32, feeds, library=path == "library", delta_softplus=0)
        with np.errstate(over="ignore"):  # exp(100) overflows: that is the point
            want = np.exp(np.float32([88.6, 100.0, 50.0]))  # 3.0e38, inf, 5.2e21
        np.testing.assert_allclose(state[0, :, 0], want, rtol=1e-6, err_msg=path)
    conv = dict(x=np.array([[[-1e38, -3e38, 5.0]]], np.float32), conv_state_in=np.zeros((1, 3, 0), np.float32),
                weight=np.ones((3, 1), np.float32), bias=np.zeros(3, np.float32))
    y, _ = run_op("CausalConv1d", np.float32, conv, silu=1)
    assert y[0, 0, 0] == 0 and y[0, 0, 1] == 0 and y[0, 0, 2] == pytest.approx(5 / (1 + np.exp(-5)), rel=1e-6)


def test_selective_scan_continues_from_its_state():
    """Two calls, the second fed the first's state, equal one call over the whole sequence."""
    feeds = scan_feeds(3, np.float32, b=2, l=24, e=33, n=16, softplus=True)
    y_all, state_all = run_op("SelectiveScan", np.float32, feeds, delta_softplus=1)
    split = lambda lo, hi: {k: v[:, lo:hi] if k in ("u", "delta", "B", "C", "z") else v  # noqa: E731
                            for k, v in feeds.items()}
    y1, state1 = run_op("SelectiveScan", np.float32, split(0, 10), delta_softplus=1)
    y2, state2 = run_op("SelectiveScan", np.float32, {**split(10, 24), "ssm_state_in": state1}, delta_softplus=1)
    assert_close(np.concatenate([y1, y2], axis=1), y_all, TOL[np.float32])
    assert_close(state2, state_all, STATE_TOL)


# ---- CausalConv1d -------------------------------------------------------------------------------------------------


def conv_feeds(seed, dtype, b, l, e, k) -> dict:
    g = Inputs(seed, dtype)
    return dict(x=g.act(b, l, e), conv_state_in=g.f32(b, e, k - 1), weight=g.f32(e, k, scale=0.5), bias=g.f32(e))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float16]), b=st.integers(1, 3),
       l=st.integers(1, 12), e=st.integers(1, 70), k=st.integers(1, 5), silu=st.booleans())
def test_causal_conv1d_matches_reference(seed, dtype, b, l, e, k, silu):
    feeds = conv_feeds(seed, dtype, b, l, e, k)
    y, state = run_op("CausalConv1d", dtype, feeds, silu=int(silu))
    t = {name: f64(v) for name, v in feeds.items()}
    y_ref, state_ref = causal_conv1d_ref(t["x"].transpose(1, 2), t["weight"], t["bias"], t["conv_state_in"], silu)
    assert y.dtype == dtype and state.dtype == np.float32 and state.shape == (b, e, k - 1)
    assert_close(y, y_ref.transpose(1, 2), TOL[dtype])
    assert_close(state, state_ref, STATE_TOL)  # the last k-1 inputs: exact copies, also when l < k-1


def test_causal_conv1d_long_sequence():
    feeds = conv_feeds(5, np.float32, b=2, l=2048, e=37, k=4)
    y, state = run_op("CausalConv1d", np.float32, feeds, silu=1)
    t = {name: f64(v) for name, v in feeds.items()}
    y_ref, state_ref = causal_conv1d_ref(t["x"].transpose(1, 2), t["weight"], t["bias"], t["conv_state_in"], True)
    assert_close(y, y_ref.transpose(1, 2), TOL[np.float32])
    assert_close(state, state_ref, STATE_TOL)


# ---- DecodeStep ---------------------------------------------------------------------------------------------------


def decode_feeds(seed, dtype, b, e, n, k, r) -> dict:
    g = Inputs(seed, dtype)
    return dict(xz=g.act(b, 1, 2 * e), conv_state_in=g.f32(b, e, k - 1), ssm_state_in=g.f32(b, e, n),
                conv_weight=g.f32(e, k, scale=0.5), conv_bias=g.f32(e), x_proj_weight=g.f32(r + 2 * n, e, scale=e**-0.5),
                dt_proj_weight=g.f32(e, r, scale=r**-0.5), dt_bias=g.f32(e, scale=0.5), A=g.negative_A(e, n), D=g.f32(e))


def decode_reference(feeds: dict, e, n, k, r):
    """MambaMixer.step in float64 with in_proj and out_proj replaced by identities: its input is xz, its output y."""
    cfg = MambaConfig(d_model=e, n_layer=1, vocab_size=8, d_state=n, d_conv=k, expand=1, dt_rank=r, conv_bias=True)
    t = {name: f64(v) for name, v in feeds.items()}
    mixer = float64_mixer(cfg, t)
    with torch.no_grad():
        y, conv_state, ssm_state = mixer.step(t["xz"][:, 0], t["conv_state_in"], t["ssm_state_in"], REFERENCE)
    return y.unsqueeze(1), conv_state, ssm_state


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float16]), b=st.integers(1, 3),
       e=st.integers(1, 300), n=st.integers(1, 17), k=st.integers(2, 5), r=st.integers(1, 12))
def test_decode_step_matches_mixer_step(seed, dtype, b, e, n, k, r):
    check_decode(seed, dtype, b, e, n, k, r)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_step_mamba_130m_shape(dtype):
    check_decode(11, dtype, b=2, e=1536, n=16, k=4, r=48)


def check_decode(seed, dtype, b, e, n, k, r):
    feeds = decode_feeds(seed, dtype, b, e, n, k, r)
    y, conv_state, ssm_state = run_op("DecodeStep", dtype, feeds)
    y_ref, conv_ref, ssm_ref = decode_reference(feeds, e, n, k, r)
    assert y.dtype == dtype and y.shape == (b, 1, e)
    assert_close(y, y_ref, TOL[dtype])
    assert_close(conv_state, conv_ref, STATE_TOL)
    assert_close(ssm_state, ssm_ref, STATE_TOL)


# ---- RMSNorm, AddRMSNorm ---------------------------------------------------------------------------------------------

NORM_PATHS = ["library", "function"]


def norm_feeds(seed: int, op: str, dtype, rdtype, b: int, l: int, d: int, scale: float = 1.0) -> dict:
    """x/residual of ~N(0, scale^2) (the residual larger than the block output, as in a model), weight ~ 1."""
    g = Inputs(seed, dtype)
    weight = (1.0 + 0.3 * g.rng.standard_normal(d)).astype(np.float32).astype(dtype)
    residual = (4 * scale * g.rng.standard_normal((b, l, d))).astype(np.float32).astype(rdtype)
    if op == "RMSNorm":
        return dict(x=residual, weight=weight)
    return dict(x=g.act(b, l, d, scale=scale), residual=residual, weight=weight)


def norm_reference(feeds: dict, op: str, rdtype, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(y in float64, residual_out): residual_out = R(float32(residual) + float32(x)) (an exact emulation of the
    contract's one rounding, so the op must match it bit for bit), y normalised from it in float64."""
    if op == "RMSNorm":
        r = feeds["x"]
    else:
        r = (feeds["residual"].astype(np.float32) + feeds["x"].astype(np.float32)).astype(rdtype)
    r64 = r.astype(np.float64)
    y = r64 / np.sqrt(np.mean(r64 * r64, axis=-1, keepdims=True) + eps) * feeds["weight"].astype(np.float64)
    return y, r


def check_norm(seed, op, dtype, rdtype, b, l, d, eps=1e-5, path="library", scale=1.0, attrs=None):
    feeds = norm_feeds(seed, op, dtype, rdtype, b, l, d, scale)
    attrs = {"epsilon": eps} if attrs is None else attrs
    outs = run_op(op, dtype, feeds, rdtype=rdtype, library=path == "library", **attrs)
    y_ref, r_ref = norm_reference(feeds, op, rdtype, eps)
    assert outs[0].dtype == dtype and outs[0].shape == (b, l, d)
    assert_close(outs[0], y_ref, TOL[dtype])
    if op == "AddRMSNorm":
        assert outs[1].dtype == rdtype and outs[1].shape == (b, l, d)
        np.testing.assert_array_equal(outs[1], r_ref)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), op=st.sampled_from(["RMSNorm", "AddRMSNorm"]),
       dtype=st.sampled_from([np.float32, np.float16]), residual_fp32=st.booleans(), b=st.integers(1, 3),
       l=st.integers(1, 5), d=st.integers(1, 300), eps=st.sampled_from([1e-5, 1e-6, 0.25]),
       path=st.sampled_from(NORM_PATHS))
def test_norms_match_reference(seed, op, dtype, residual_fp32, b, l, d, eps, path):
    check_norm(seed, op, dtype, np.float32 if residual_fp32 else dtype, b, l, d, eps, path)


@pytest.mark.parametrize("path", NORM_PATHS)
@pytest.mark.parametrize("op", ["RMSNorm", "AddRMSNorm"])
@pytest.mark.parametrize("dtype,rdtype", [(np.float32, np.float32), (np.float16, np.float32),
                                          (np.float16, np.float16)])
def test_norms_mamba_130m_shapes(op, dtype, rdtype, path):
    """d_model 768: one decode row (inline), and a 2 x 300 prefill (rows shared between the pool's threads)."""
    check_norm(1, op, dtype, rdtype, 1, 1, 768, path=path)
    check_norm(2, op, dtype, rdtype, 2, 300, 768, path=path)


@pytest.mark.parametrize("path", NORM_PATHS)
def test_norms_extreme_values(path):
    """Rows of large values (float16 residual sums near its range, float32 squares near 1e30), zeros, tiny values."""
    check_norm(3, "AddRMSNorm", np.float16, np.float16, 2, 3, 257, path=path, scale=1500.0)
    check_norm(4, "AddRMSNorm", np.float32, np.float32, 2, 3, 257, path=path, scale=1e14)
    for op in ("RMSNorm", "AddRMSNorm"):
        feeds = norm_feeds(5, op, np.float32, np.float32, 1, 2, 64)
        for k in feeds:
            if k != "weight":
                feeds[k][0, 0] = 0.0
                feeds[k][0, 1] *= 1e-20
        outs = run_op(op, np.float32, feeds, library=path == "library", epsilon=1e-5)
        y_ref, _ = norm_reference(feeds, op, np.float32, 1e-5)
        assert_close(outs[0], y_ref, TOL[np.float32])


@pytest.mark.parametrize("path", NORM_PATHS)
def test_norm_epsilon_defaults_to_1e_5(path):
    check_norm(6, "AddRMSNorm", np.float32, np.float32, 1, 2, 40, eps=1e-5, path=path, scale=1e-3, attrs={})
    check_norm(6, "RMSNorm", np.float32, np.float32, 1, 2, 40, eps=1e-5, path=path, scale=1e-3, attrs={})


# ---- invalid inputs -------------------------------------------------------------------------------------------------

# name -> (op, attributes, changes to valid feeds, declared-dtype overrides, strings the error must contain).
# Valid shapes: SelectiveScan b=2 l=3 e=5 n=4; CausalConv1d b=2 l=3 e=5 k=4; DecodeStep b=2 e=5 n=4 k=4 r=3.
BAD_CASES = {
    "scan_u_rank": ("SelectiveScan", {}, {"u": np.zeros((2, 15), np.float32)}, {}, ["'u'", "rank 2", "rank 3"]),
    "scan_empty_sequence": ("SelectiveScan", {}, {"u": np.zeros((2, 0, 5), np.float32),
                                                  "delta": np.zeros((2, 0, 5), np.float32),
                                                  "z": np.zeros((2, 0, 5), np.float32),
                                                  "B": np.zeros((2, 0, 4), np.float32),
                                                  "C": np.zeros((2, 0, 4), np.float32)},
                            {}, ["'u'", "l = 0", "empty sequence"]),
    "scan_B_state_size": ("SelectiveScan", {}, {"B": np.zeros((2, 3, 5), np.float32)}, {}, ["'B'", "[2, 3, 5]", "n=4"]),
    "scan_delta_length": ("SelectiveScan", {}, {"delta": np.zeros((2, 4, 5), np.float32)}, {}, ["'delta'", "l=3"]),
    "scan_A_channels": ("SelectiveScan", {}, {"A": -np.ones((6, 4), np.float32)}, {}, ["'A'", "e=5"]),
    "scan_D_channels": ("SelectiveScan", {}, {"D": np.zeros(4, np.float32)}, {}, ["'D'", "e=5"]),
    "scan_state_batch": ("SelectiveScan", {}, {"ssm_state_in": np.zeros((1, 5, 4), np.float32)}, {},
                         ["'ssm_state_in'", "b=2"]),
    "scan_A_float64": ("SelectiveScan", {}, {"A": -np.ones((5, 4))}, {"A": np.float64}, ["SelectiveScan"]),
    "scan_mixed_T": ("SelectiveScan", {}, {"delta": np.zeros((2, 3, 5), np.float16)}, {"delta": np.float16},
                     ["SelectiveScan"]),
    "scan_softplus_attr": ("SelectiveScan", {"delta_softplus": 2}, {}, {}, ["delta_softplus", "0 or 1"]),
    "scan_softplus_float": ("SelectiveScan", {"delta_softplus": 1.0}, {}, {}, ["delta_softplus", "not an int"]),
    # a list is no scalar: it used to read as "not set" (the default), silently
    "scan_softplus_list": ("SelectiveScan", {"delta_softplus": [0]}, {}, {}, ["delta_softplus", "not an int"]),
    "conv_silu_list": ("CausalConv1d", {"silu": [0]}, {}, {}, ["silu", "not an int"]),
    "conv_silu_string": ("CausalConv1d", {"silu": "yes"}, {}, {}, ["silu", "not an int"]),
    "conv_x_rank": ("CausalConv1d", {}, {"x": np.zeros((2, 3, 5, 1), np.float32)}, {}, ["'x'", "rank 4"]),
    "conv_empty_sequence": ("CausalConv1d", {}, {"x": np.zeros((2, 0, 5), np.float32)}, {}, ["'x'", "l = 0"]),
    "conv_weight_channels": ("CausalConv1d", {}, {"weight": np.zeros((4, 4), np.float32)}, {}, ["'weight'", "e=5"]),
    "conv_state_width": ("CausalConv1d", {}, {"conv_state_in": np.zeros((2, 5, 2), np.float32)}, {},
                         ["'conv_state_in'", "k-1=3"]),
    "conv_bias_size": ("CausalConv1d", {}, {"bias": np.zeros(6, np.float32)}, {}, ["'bias'", "e=5"]),
    "conv_silu_attr": ("CausalConv1d", {"silu": -1}, {}, {}, ["silu", "0 or 1"]),
    "decode_two_tokens": ("DecodeStep", {}, {"xz": np.zeros((2, 2, 10), np.float32)}, {}, ["'xz'", "l=1"]),
    "decode_odd_xz": ("DecodeStep", {}, {"xz": np.zeros((2, 1, 11), np.float32)}, {}, ["'xz'", "2e (even)=10"]),
    "decode_x_proj_rows": ("DecodeStep", {}, {"x_proj_weight": np.zeros((10, 5), np.float32)}, {},
                           ["'x_proj_weight'", "r+2n=11"]),
    "decode_dt_proj_channels": ("DecodeStep", {}, {"dt_proj_weight": np.zeros((4, 3), np.float32)}, {},
                                ["'dt_proj_weight'", "e=5"]),
    "decode_ssm_state": ("DecodeStep", {}, {"ssm_state_in": np.zeros((2, 5, 3), np.float32)}, {},
                         ["'ssm_state_in'", "n=4"]),
    "decode_conv_state_batch": ("DecodeStep", {}, {"conv_state_in": np.zeros((3, 5, 3), np.float32)}, {},
                                ["'conv_state_in'", "b=2"]),
    "decode_A_rank": ("DecodeStep", {}, {"A": np.zeros(20, np.float32)}, {}, ["'A'", "rank 1"]),
    "norm_x_rank": ("RMSNorm", {}, {"x": np.ones((2, 15), np.float32)}, {}, ["RMSNorm", "'x'", "rank 2", "rank 3"]),
    "norm_weight_width": ("RMSNorm", {}, {"weight": np.ones(6, np.float32)}, {}, ["RMSNorm", "'weight'", "d=5"]),
    "norm_weight_rank": ("RMSNorm", {}, {"weight": np.ones((1, 5), np.float32)}, {}, ["'weight'", "[1, 5]", "d=5"]),
    "norm_empty_batch": ("RMSNorm", {}, {"x": np.ones((0, 3, 5), np.float32)}, {}, ["'x'", "b = 0", "empty batch"]),
    "norm_empty_sequence": ("RMSNorm", {}, {"x": np.ones((2, 0, 5), np.float32)}, {}, ["'x'", "l = 0"]),
    "norm_empty_row": ("RMSNorm", {}, {"x": np.ones((2, 3, 0), np.float32), "weight": np.ones(0, np.float32)}, {},
                       ["'x'", "d = 0", "empty row"]),
    "norm_weight_float64": ("RMSNorm", {}, {"weight": np.ones(5)}, {"weight": np.float64}, ["RMSNorm"]),
    "norm_epsilon_negative": ("RMSNorm", {"epsilon": -1e-5}, {}, {}, ["epsilon", ">= 0"]),
    "norm_epsilon_int": ("RMSNorm", {"epsilon": 1}, {}, {}, ["epsilon", "not a float"]),
    "norm_epsilon_list": ("RMSNorm", {"epsilon": [100.0]}, {}, {}, ["epsilon", "not a float"]),
    "add_norm_epsilon_int_list": ("AddRMSNorm", {"epsilon": [1, 2]}, {}, {}, ["epsilon", "not a float"]),
    "norm_epsilon_nan": ("AddRMSNorm", {"epsilon": float("nan")}, {}, {}, ["AddRMSNorm", "epsilon", "finite"]),
    "add_norm_x_rank": ("AddRMSNorm", {}, {"x": np.ones((2, 3, 5, 1), np.float32)}, {},
                        ["AddRMSNorm", "'x'", "rank 4"]),
    "add_norm_residual_length": ("AddRMSNorm", {}, {"residual": np.ones((2, 4, 5), np.float32)}, {},
                                 ["AddRMSNorm", "'residual'", "[2, 4, 5]", "l=3"]),
    "add_norm_residual_width": ("AddRMSNorm", {}, {"residual": np.ones((2, 3, 6), np.float32)}, {},
                                ["'residual'", "d=5"]),
    "add_norm_residual_rank": ("AddRMSNorm", {}, {"residual": np.ones((6, 5), np.float32)}, {},
                               ["'residual'", "[6, 5]"]),
    "add_norm_weight_width": ("AddRMSNorm", {}, {"weight": np.ones(4, np.float32)}, {}, ["'weight'", "d=5"]),
    "add_norm_empty_sequence": ("AddRMSNorm", {}, {"x": np.ones((2, 0, 5), np.float32),
                                                   "residual": np.ones((2, 0, 5), np.float32)}, {},
                                ["'x'", "l = 0"]),
    "add_norm_mixed_T": ("AddRMSNorm", {}, {"x": np.ones((2, 3, 5), np.float16)}, {"x": np.float16},
                         ["AddRMSNorm"]),
    "add_norm_residual_float64": ("AddRMSNorm", {}, {"residual": np.ones((2, 3, 5))}, {"residual": np.float64},
                                  ["AddRMSNorm"]),
}


def valid_small_feeds(op: str) -> dict:
    if op == "SelectiveScan":
        return scan_feeds(0, np.float32, b=2, l=3, e=5, n=4, softplus=True)
    if op == "CausalConv1d":
        return conv_feeds(0, np.float32, b=2, l=3, e=5, k=4)
    if op in ("RMSNorm", "AddRMSNorm"):
        return norm_feeds(0, op, np.float32, np.float32, b=2, l=3, d=5)
    return decode_feeds(0, np.float32, b=2, e=5, n=4, k=4, r=3)


def run_bad_case(name: str) -> dict:
    """Build and run one invalid case; report whether onnxruntime raised, and its message."""
    op, attrs, changes, dtypes, _ = BAD_CASES[name]
    return outcome_of(lambda: op_session(single_node_model(op, np.float32, attrs, dtypes)).run(
        None, {**valid_small_feeds(op), **changes}))


(bad_case_outcomes, test_invalid_input_is_an_onnxruntime_error,
 test_bad_case_subprocess_exits_cleanly) = bad_case_tests(__file__, BAD_CASES, lambda case: case[4])


def register_with_too_old_onnxruntime() -> str:
    """Call RegisterCustomOps with an API base that, like onnxruntime < 1.21, has no version-21 API table (the real
    one of this onnxruntime, minus that version); return the message of the status it gives back."""
    capi = Path(ort.__file__).parent / "capi"
    ortlib = ctypes.CDLL(str(next(capi.glob("libonnxruntime.so*"))))
    ortlib.OrtGetApiBase.restype = ctypes.c_void_p
    get_api_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_t = ctypes.CFUNCTYPE(ctypes.c_void_p)

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api_t), ("GetVersionString", version_t)]

    real = ApiBase.from_address(ortlib.OrtGetApiBase())
    old_version = ctypes.create_string_buffer(b"1.20.0")
    old = ApiBase(get_api_t(lambda version: real.GetApi(version) if version < 21 else None),
                  version_t(lambda: ctypes.addressof(old_version)))
    library = ctypes.CDLL(custom_op_library_path())
    library.RegisterCustomOps.restype = ctypes.c_void_p
    library.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    status = library.RegisterCustomOps(None, ctypes.addressof(old))
    assert status, "RegisterCustomOps returned success without a usable API"
    # OrtApi starts with CreateStatus, GetErrorCode, GetErrorMessage in every version.
    get_error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p).from_address(
        real.GetApi(1) + 2 * ctypes.sizeof(ctypes.c_void_p))
    return get_error_message(status).decode()


def test_too_old_onnxruntime_gets_an_error_status():
    proc = subprocess.run([sys.executable, __file__, "--too-old-onnxruntime"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "C API version 21" in proc.stdout and "this is onnxruntime 1.20.0" in proc.stdout, proc.stdout


@pytest.mark.parametrize("op", ["SelectiveScan", "DecodeStep", "AddRMSNorm"])
def test_results_do_not_depend_on_the_thread_count(op):
    """Tasks own disjoint outputs, so 1 and 3 threads give bit-identical results."""
    feeds = (scan_feeds(4, np.float32, b=3, l=20, e=150, n=16, softplus=True) if op == "SelectiveScan"
             else decode_feeds(4, np.float32, b=3, e=600, n=16, k=4, r=24) if op == "DecodeStep"
             else norm_feeds(4, op, np.float32, np.float32, b=3, l=100, d=500))  # 300 rows: several tasks
    model = single_node_model(op, np.float32, {})
    results = []
    for threads in (1, 3):
        options = ort.SessionOptions()
        options.register_custom_ops_library(custom_op_library_path())
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds))
    for one, three in zip(*results):
        np.testing.assert_array_equal(one, three)


if __name__ == "__main__" and sys.argv[1:] == ["--bad-cases"]:
    for case in sorted(BAD_CASES):
        print(json.dumps({case: run_bad_case(case)}), flush=True)
if __name__ == "__main__" and sys.argv[1:] == ["--too-old-onnxruntime"]:
    print(register_with_too_old_onnxruntime())


def test_rebuilding_never_rewrites_the_installed_library_in_place():
    """tools/build_custom_ops.sh must not write into a library that processes (this test run) have loaded: a build
    that changes nothing leaves the installed file untouched (same inode, same ctime, which any write would move);
    a changed build replaces it by a rename (a new inode)."""
    installed = Path(custom_op_library_path())
    root = Path(__file__).resolve().parents[1]
    if installed.parent != root / "runtime" / "mamba_runtime" / "lib":
        pytest.skip("the library in use is not the one tools/build_custom_ops.sh installs")
    before, content = installed.stat(), installed.read_bytes()
    proc = subprocess.run(["bash", "tools/build_custom_ops.sh"], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = installed.stat()
    if installed.read_bytes() == content:
        assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    else:
        assert after.st_ino != before.st_ino
