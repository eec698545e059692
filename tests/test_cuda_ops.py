"""The CUDA kernels of the custom-op library, alone: one-node graphs on onnxruntime's CUDA execution provider against
the float64 reference operators (mamba_export.ops; a float64 RMSNorm for the norms), on random shapes including long
sequences and batch 64, for float32, float16 and bfloat16 activations (the norms and DecodeBlock also with a float32 or T
residual). Outputs are poisoned with NaN before each run. Needs a GPU and
onnxruntime-gpu (skipped otherwise); tools/gpu_check.sh runs them on the GPU machine."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch  # before onnxruntime: loads the CUDA libraries onnxruntime-gpu needs

import onnxruntime as ort

ort.set_default_logger_severity(3)  # quiet the per-session CUDA EP device notices
from onnx import TensorProto, helper

from mamba_export.ops import (
    causal_conv1d_ref,
    causal_conv1d_step_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider")]

DOMAIN = "ai.mamba_export"
ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
# ||out - ref|| / ||ref|| bounds for y: float32 arithmetic; one rounding of y to float16 / bfloat16 (2^-11, 2^-8)
# plus float32 arithmetic. States are float32 in every case.
Y_TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.5e-2}
STATE_TOL = 1e-4


def library() -> str:
    from mamba_runtime import custom_op_library_path

    return custom_op_library_path()


def seed_of(*key) -> int:
    """A seed that is the same in every process (str hashes are salted per process)."""
    return zlib.crc32(repr(key).encode())


def rel_err(out: np.ndarray, ref: torch.Tensor) -> float:
    out = torch.from_numpy(np.asarray(out, dtype=np.float64))
    assert torch.isfinite(out).all(), "output holds NaN/inf (an element was not written, or overflow)"
    return float((out - ref).norm() / ref.norm())


def rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x rounded to the activation dtype, as float64: exactly the values the kernel sees through :func:`as_feed`.

    float16 rounds with numpy, as the feed does: torch rounds float64 -> float16 through float32, which differs from
    numpy's direct rounding by one float16 ulp on rare values (seen on the GPU: 3.689453125 against 3.693359375)."""
    if dtype == "float16":
        return torch.from_numpy(x.numpy().astype(np.float16).astype(np.float64))
    return x.to(getattr(torch, dtype)).to(torch.float64)


def as_feed(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Host array for a graph input of ``dtype``; bfloat16 travels as float32 and is cast inside the graph (exact)."""
    return x.numpy().astype(np.float16 if dtype == "float16" else np.float32)


class OneNodeModel:
    """A graph of one ai.mamba_export node, every dim symbolic (so that bad shapes reach the kernel's checks).

    Inputs/outputs named in ``t_names`` have the activation dtype; the rest are float32. bfloat16 activations enter
    as float32 graph inputs with a Cast (numpy has no bfloat16) and leave through a Cast to float32.
    """

    def __init__(self, op: str, inputs: dict[str, int], outputs: dict[str, int], t_names: set[str], dtype: str,
                 **attrs):
        nodes, g_in, g_out, node_in, node_out = [], [], [], [], []
        bf16 = dtype == "bfloat16"
        for name, rank in inputs.items():
            is_t = name in t_names
            g_type = TensorProto.FLOAT if (not is_t or bf16) else ONNX_TYPE[dtype]
            g_in.append(helper.make_tensor_value_info(name, g_type, [f"{name}_{i}" for i in range(rank)]))
            if is_t and bf16:
                nodes.append(helper.make_node("Cast", [name], [name + "_t"], to=TensorProto.BFLOAT16))
                node_in.append(name + "_t")
            else:
                node_in.append(name)
        post = []
        for name, rank in outputs.items():
            is_t = name in t_names
            g_type = TensorProto.FLOAT if (not is_t or bf16) else ONNX_TYPE[dtype]
            g_out.append(helper.make_tensor_value_info(name, g_type, [f"{name}_{i}" for i in range(rank)]))
            if is_t and bf16:
                post.append(helper.make_node("Cast", [name + "_t"], [name], to=TensorProto.FLOAT))
                node_out.append(name + "_t")
            else:
                node_out.append(name)
        nodes.append(helper.make_node(op, node_in, node_out, domain=DOMAIN, **attrs))
        graph = helper.make_graph(nodes + post, op, g_in, g_out)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                                  ir_version=10)
        so = ort.SessionOptions()
        so.register_custom_ops_library(library())
        so.log_severity_level = 3
        # Every node must run on the GPU: a custom op without a CUDA kernel makes session creation fail here.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        self.session = ort.InferenceSession(model.SerializeToString(), so,
                                            providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
        self.outputs = list(outputs)

    def run(self, feeds: dict[str, np.ndarray], out_shapes: dict[str, tuple[int, ...]]) -> list[np.ndarray]:
        """Run with inputs copied to the GPU and outputs preallocated on the GPU, filled with NaN."""
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0))
        values = []
        types = {o.name: o.type for o in self.session.get_outputs()}
        for name in self.outputs:
            np_type = np.float16 if types[name] == "tensor(float16)" else np.float32
            v = ort.OrtValue.ortvalue_from_numpy(np.full(out_shapes[name], np.nan, dtype=np_type), "cuda", 0)
            binding.bind_ortvalue_output(name, v)
            values.append(v)
        self.session.run_with_iobinding(binding)
        return [v.numpy() for v in values]


# ---- SelectiveScan ---------------------------------------------------------------------------------------------
SCAN_IN = {"u": 3, "delta": 3, "A": 2, "B": 3, "C": 3, "D": 1, "z": 3, "delta_bias": 1, "ssm_state_in": 3}
SCAN_OUT = {"y": 3, "ssm_state_out": 3}
SCAN_T = {"u", "delta", "B", "C", "z", "y"}
SCAN_SHAPES = [  # b, l, e, n
    (1, 1, 8, 16),
    (2, 37, 100, 16),
    (3, 300, 67, 4),
    (1, 2048, 192, 16),   # long sequence
    (64, 33, 96, 16),     # batch 64
    (2, 50, 40, 256),     # largest d_state
    (2, 19, 33, 20),      # d_state not a power of two
    (1, 70, 24, 1),
]


def scan_inputs(b, l, e, n, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "u": r(b, l, e), "delta": r(b, l, e) * 0.5 - 1.0, "A": -torch.exp(r(e, n) * 0.5), "B": r(b, l, n),
        "C": r(b, l, n), "D": r(e), "z": r(b, l, e), "delta_bias": r(e) * 0.3, "ssm_state_in": r(b, e, n),
    }


def scan_reference(x: dict, dtype: str):
    t = {k: (rounded(v, dtype) if k in SCAN_T else v.float().double()) for k, v in x.items()}
    y, h = selective_scan_ref(
        t["u"].transpose(1, 2), t["delta"].transpose(1, 2), t["A"], t["B"].transpose(1, 2), t["C"].transpose(1, 2),
        t["D"], t["z"].transpose(1, 2), t["delta_bias"], True, t["ssm_state_in"])
    return y.transpose(1, 2), h


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_selective_scan_matches_reference(shape, dtype):
    b, l, e, n = shape
    x = scan_inputs(b, l, e, n, seed=seed_of(shape, dtype))
    model = OneNodeModel("SelectiveScan", SCAN_IN, SCAN_OUT, SCAN_T, dtype)
    feeds = {k: as_feed(v, dtype) if k in SCAN_T else v.float().numpy() for k, v in x.items()}
    y, h = model.run(feeds, {"y": (b, l, e), "ssm_state_out": (b, e, n)})
    y_ref, h_ref = scan_reference(x, dtype)
    assert rel_err(y, y_ref) < Y_TOL[dtype]
    assert rel_err(h, h_ref) < STATE_TOL


def test_selective_scan_chunks_continue_the_state():
    """Two calls, the second fed the first's state, equal one call over the whole sequence."""
    b, l, e, n = 2, 130, 64, 16
    x = scan_inputs(b, l, e, n, seed=3)
    model = OneNodeModel("SelectiveScan", SCAN_IN, SCAN_OUT, SCAN_T, "float32")
    feeds = {k: v.float().numpy() for k, v in x.items()}
    y_all, h_all = model.run(feeds, {"y": (b, l, e), "ssm_state_out": (b, e, n)})
    cut, state, ys = 77, feeds["ssm_state_in"], []
    for lo, hi in ((0, cut), (cut, l)):
        part = {k: (np.ascontiguousarray(v[:, lo:hi]) if k in SCAN_T else v) for k, v in feeds.items()}
        part["ssm_state_in"] = state
        y, state = model.run(part, {"y": (b, hi - lo, e), "ssm_state_out": (b, e, n)})
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, h_all, rtol=1e-5, atol=1e-5)


# ---- CausalConv1d ----------------------------------------------------------------------------------------------
CONV_IN = {"x": 3, "conv_state_in": 3, "weight": 2, "bias": 1}
CONV_OUT = {"y": 3, "conv_state_out": 3}
CONV_T = {"x", "y"}
CONV_SHAPES = [(1, 1, 8, 4), (2, 2, 50, 4), (3, 37, 100, 4), (1, 2048, 192, 4), (64, 9, 96, 4), (2, 5, 33, 3),
               (2, 6, 20, 2)]  # b, l, e, k


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_causal_conv1d_matches_reference(shape, dtype):
    b, l, e, k = shape
    g = torch.Generator().manual_seed(seed_of(shape, dtype))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"x": r(b, l, e), "conv_state_in": r(b, e, k - 1), "weight": r(e, k) * 0.5, "bias": r(e)}
    model = OneNodeModel("CausalConv1d", CONV_IN, CONV_OUT, CONV_T, dtype)
    feeds = {k_: as_feed(v, dtype) if k_ in CONV_T else v.float().numpy() for k_, v in x.items()}
    y, st = model.run(feeds, {"y": (b, l, e), "conv_state_out": (b, e, k - 1)})
    xr = rounded(x["x"], dtype)
    y_ref, st_ref = causal_conv1d_ref(xr.transpose(1, 2), x["weight"].float().double(), x["bias"].float().double(),
                                      x["conv_state_in"].float().double(), True)
    assert rel_err(y, y_ref.transpose(1, 2)) < Y_TOL[dtype]
    assert rel_err(st, st_ref) < 1e-6  # a copy of inputs: exact up to float32 storage


# ---- DecodeStep ------------------------------------------------------------------------------------------------
STEP_IN = {"xz": 3, "conv_state_in": 3, "ssm_state_in": 3, "conv_weight": 2, "conv_bias": 1, "x_proj_weight": 2,
           "dt_proj_weight": 2, "dt_bias": 1, "A": 2, "D": 1}
STEP_OUT = {"y": 3, "conv_state_out": 3, "ssm_state_out": 3}
STEP_T = {"xz", "y"}
STEP_SHAPES = [  # b, e, n, k, r
    (1, 64, 16, 4, 4),
    (5, 100, 16, 4, 7),
    (64, 96, 16, 4, 6),       # batch 64
    (3, 48, 8, 3, 5),
    (2, 40, 4, 2, 7),
    (2, 32, 256, 4, 8),
    (1, 1536, 16, 4, 48),     # mamba-130m's mixer
    (9, 600, 16, 4, 38),      # channels not a multiple of the 256-channel tile, batch not of the 8-sequence group
    (64, 4096, 16, 4, 128),   # mamba-1.4b's mixer at batch 64: more phase-1 items than resident blocks
]
# MAMBA_EXPORT_CUDA_DECODE: "auto" (unset: the fused cooperative kernel at small batches), "split" (one kernel per
# phase) or "unfolded" (phase 1, the partials' reduction, phase 2); kernels/cuda/decode_step.cu.
DECODE_PATHS = ["auto", "split", "unfolded"]


def set_decode_path(monkeypatch, path: str) -> None:
    if path == "auto":
        monkeypatch.delenv("MAMBA_EXPORT_CUDA_DECODE", raising=False)
    else:
        monkeypatch.setenv("MAMBA_EXPORT_CUDA_DECODE", path)


@pytest.mark.parametrize("path", DECODE_PATHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_step_matches_reference(shape, dtype, path, monkeypatch):
    set_decode_path(monkeypatch, path)
    b, e, n, k, r_ = shape
    g = torch.Generator().manual_seed(seed_of(shape, dtype))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"xz": r(b, 1, 2 * e), "conv_state_in": r(b, e, k - 1), "ssm_state_in": r(b, e, n),
         "conv_weight": r(e, k) * 0.5, "conv_bias": r(e) * 0.5, "x_proj_weight": r(r_ + 2 * n, e) / e ** 0.5,
         "dt_proj_weight": r(e, r_) / r_ ** 0.5, "dt_bias": r(e) * 0.5 - 1.0, "A": -torch.exp(r(e, n) * 0.5),
         "D": r(e)}
    model = OneNodeModel("DecodeStep", STEP_IN, STEP_OUT, STEP_T, dtype)
    feeds = {k_: as_feed(v, dtype) if k_ in STEP_T else v.float().numpy() for k_, v in x.items()}
    y, conv, ssm = model.run(feeds, {"y": (b, 1, e), "conv_state_out": (b, e, k - 1), "ssm_state_out": (b, e, n)})

    t = {k_: (rounded(v, dtype) if k_ in STEP_T else v.float().double()) for k_, v in x.items()}
    xs, z = t["xz"][:, 0, :e], t["xz"][:, 0, e:]
    xc, conv_ref = causal_conv1d_step_ref(xs, t["conv_weight"], t["conv_bias"], t["conv_state_in"], True)
    dt, B, C = torch.split(xc @ t["x_proj_weight"].T, [r_, n, n], dim=-1)
    y_ref, ssm_ref = selective_state_update_ref(t["ssm_state_in"], xc, dt @ t["dt_proj_weight"].T, t["A"], B, C,
                                                t["D"], z, t["dt_bias"], True)
    assert rel_err(y[:, 0], y_ref) < Y_TOL[dtype]
    assert rel_err(conv, conv_ref) < 1e-6
    assert rel_err(ssm, ssm_ref) < STATE_TOL


@pytest.mark.parametrize("shape", [(8, 768, 16, 4, 24), (64, 4096, 16, 4, 128)], ids=lambda s: "x".join(map(str, s)))
def test_decode_step_is_deterministic(shape, monkeypatch):
    """Same inputs, bit-identical outputs (no atomics): needed for identical tokens with CUDA graphs on and off.
    The three paths run the same per-item code in the same summation order, so they agree bit for bit too."""
    b, e, n, k, r_ = shape
    g = torch.Generator().manual_seed(5)
    feeds = {name: torch.randn(*s, generator=g).numpy() for name, s in {
        "xz": (b, 1, 2 * e), "conv_state_in": (b, e, k - 1), "ssm_state_in": (b, e, n), "conv_weight": (e, k),
        "conv_bias": (e,), "x_proj_weight": (r_ + 2 * n, e), "dt_proj_weight": (e, r_), "dt_bias": (e,),
        "A": (e, n), "D": (e,)}.items()}
    feeds["A"] = -np.abs(feeds["A"])
    model = OneNodeModel("DecodeStep", STEP_IN, STEP_OUT, STEP_T, "float32")
    shapes = {"y": (b, 1, e), "conv_state_out": (b, e, k - 1), "ssm_state_out": (b, e, n)}
    runs = []
    for path in ("auto", "auto", "split", "unfolded"):
        set_decode_path(monkeypatch, path)
        runs.append(model.run(feeds, shapes))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert np.array_equal(a, c)


# ---- RMSNorm, AddRMSNorm ----------------------------------------------------------------------------------------
NORM_SHAPES = [  # b, l, d
    (1, 1, 768),      # a decode step of mamba-130m
    (64, 1, 768),     # batch 64
    (2, 300, 768),    # prefill
    (3, 17, 257),     # odd d
    (2, 3, 1),        # d = 1
    (4, 5, 2560),     # mamba-2.8b's d_model: 1024 threads
    (1, 2, 9000),     # wider than the 8192 values a block keeps in registers
]
NORM_TYPES = [("float32", "float32"), ("float16", "float32"), ("bfloat16", "float32"), ("float16", "float16"),
              ("bfloat16", "bfloat16")]  # (T, R)


def norm_case(op: str, b: int, l: int, d: int, dtype: str, rdtype: str, seed: int):
    """(model, feeds, output shapes, y reference in float64, residual_out reference as float64).

    residual_out = R(float32(residual) + float32(x)) is emulated exactly (one float32 add, one rounding to R), so the
    kernel must match it bit for bit; y is the float64 RMSNorm of that rounded sum."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"x": r(b, l, d), "residual": 4 * r(b, l, d), "weight": 1 + 0.3 * r(d)}
    if op == "RMSNorm":
        x = {"x": x["residual"], "weight": x["weight"]}
    r_names = {"residual", "residual_out"} if op == "AddRMSNorm" else {"x"}
    t_names = {"weight", "y"} | ({"x"} if op == "AddRMSNorm" else set())
    if rdtype != "float32":
        t_names |= r_names
    types = {k: (dtype if k in t_names else "float32") for k in (*x, "y", "residual_out")}
    t = {k: rounded(v, types[k]) for k, v in x.items()}
    if op == "AddRMSNorm":
        res = (t["residual"].float() + t["x"].float()).to(getattr(torch, rdtype)).double()
    else:
        res = t["x"]
    y = res / torch.sqrt(res.pow(2).mean(-1, keepdim=True) + 1e-5) * t["weight"]
    ins = {k: (1 if k == "weight" else 3) for k in x}
    outs = {"y": 3, **({"residual_out": 3} if op == "AddRMSNorm" else {})}
    model = OneNodeModel(op, ins, outs, t_names, dtype, epsilon=1e-5)
    feeds = {k: as_feed(v, dtype) if k in t_names else v.float().numpy() for k, v in x.items()}
    return model, feeds, {k: (b, l, d) for k in outs}, y, res


@pytest.mark.parametrize("dtype,rdtype", NORM_TYPES, ids=lambda v: v)
@pytest.mark.parametrize("op", ["RMSNorm", "AddRMSNorm"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_norms_match_reference(shape, op, dtype, rdtype):
    model, feeds, out_shapes, y_ref, res_ref = norm_case(op, *shape, dtype, rdtype, seed=seed_of(shape, op, dtype))
    outs = model.run(feeds, out_shapes)
    assert rel_err(outs[0], y_ref) < Y_TOL[dtype]
    if op == "AddRMSNorm":
        np.testing.assert_array_equal(outs[1].astype(np.float64), res_ref.numpy())


def test_norm_bad_inputs_are_clear_errors():
    model, feeds, out_shapes, _, _ = norm_case("AddRMSNorm", 2, 3, 16, "float32", "float32", seed=1)
    bad = {**feeds, "residual": np.zeros((2, 4, 16), np.float32)}
    with pytest.raises(Exception, match=r"AddRMSNorm \(CUDA\): input 'residual' must have shape \[2, 3, 16\]"):
        model.run(bad, out_shapes)
    bad = {**feeds, "weight": np.zeros(15, np.float32)}
    with pytest.raises(Exception, match=r"AddRMSNorm \(CUDA\): input 'weight' must have shape \[16\]"):
        model.run(bad, out_shapes)
    bad = {**feeds, "x": np.zeros((2, 0, 16), np.float32), "residual": np.zeros((2, 0, 16), np.float32)}
    with pytest.raises(Exception, match=r"AddRMSNorm \(CUDA\): input 'x' must have shape"):
        model.run(bad, {k: (2, 0, 16) for k in out_shapes})
    with pytest.raises(Exception, match=r"RMSNorm \(CUDA\): attribute 'epsilon' is -1"):
        OneNodeModel("RMSNorm", {"x": 3, "weight": 1}, {"y": 3}, {"weight", "y"}, "float32", epsilon=-1.0)


# ---- DecodeBlock -----------------------------------------------------------------------------------------------
BLOCK_IN = {"x": 3, "residual": 3, "norm_weight": 1, "in_proj_weight": 2, "conv_state_in": 3, "ssm_state_in": 3,
            "conv_weight": 2, "conv_bias": 1, "x_proj_weight": 2, "dt_proj_weight": 2, "dt_bias": 1, "A": 2, "D": 1,
            "out_proj_weight": 2}
BLOCK_OUT = {"out": 3, "residual_out": 3, "conv_state_out": 3, "ssm_state_out": 3}
BLOCK_SHAPES = [  # b, d, e, n, k, r
    (1, 768, 1536, 16, 4, 48),     # mamba-130m at batch 1 (the NB = 1 build, fused)
    (1, 2048, 4096, 16, 4, 128),   # mamba-1.4b at batch 1
    (8, 768, 1536, 16, 4, 48),     # one full group
    (3, 100, 204, 12, 3, 7),       # a partial group, channels not a multiple of the 16-channel tile
    (64, 256, 512, 16, 4, 16),     # eight groups
    (2, 36, 72, 160, 4, 3),        # d_state > 128 (8 states per thread), r + 2n > 256 x_proj rows
    (5, 37, 74, 16, 1, 5),         # odd d (scalar weight loads), d_conv 1 (no conv state)
    (9, 2600, 5200, 16, 4, 163),   # d beyond one 2048-value chunk, two groups
]
# out goes through three more roundings to T than DecodeStep's y (h, xz and y itself), each emulated in the reference.
BLOCK_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def block_case(b, d, e, n, k, r_, dtype, rdtype, seed):
    """(model, feeds, output shapes, references as float64) for one DecodeBlock node. The reference rounds h, xz and
    y to T where the op does, in float64 otherwise; residual_out is emulated exactly."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"x": r(b, 1, d), "residual": 2 * r(b, 1, d), "norm_weight": 1 + 0.2 * r(d),
         "in_proj_weight": r(2 * e, d) / d ** 0.5, "conv_state_in": r(b, e, k - 1), "ssm_state_in": r(b, e, n),
         "conv_weight": r(e, k) * 0.5, "conv_bias": r(e) * 0.5, "x_proj_weight": r(r_ + 2 * n, e) / e ** 0.5,
         "dt_proj_weight": r(e, r_) / r_ ** 0.5, "dt_bias": r(e) * 0.5 - 1.0, "A": -torch.exp(r(e, n) * 0.5),
         "D": r(e), "out_proj_weight": r(d, e) / e ** 0.5}
    t_names = {"x", "norm_weight", "in_proj_weight", "out_proj_weight", "out"}
    if rdtype != "float32":
        t_names |= {"residual", "residual_out"}
    t = {k_: (rounded(v, dtype) if k_ in t_names else v.float().double()) for k_, v in x.items()}
    res = (t["residual"].float() + t["x"].float()).to(getattr(torch, rdtype)).double()[:, 0]
    h = rounded(res / torch.sqrt(res.pow(2).mean(-1, keepdim=True) + 1e-5) * t["norm_weight"], dtype)
    xz = rounded(h @ t["in_proj_weight"].T, dtype)
    xs, z = xz[:, :e], xz[:, e:]
    xc, conv_ref = causal_conv1d_step_ref(xs, t["conv_weight"], t["conv_bias"], t["conv_state_in"], True)
    dt, B, C = torch.split(xc @ t["x_proj_weight"].T, [r_, n, n], dim=-1)
    y, ssm_ref = selective_state_update_ref(t["ssm_state_in"], xc, dt @ t["dt_proj_weight"].T, t["A"], B, C, t["D"],
                                            z, t["dt_bias"], True)
    out_ref = rounded(y, dtype) @ t["out_proj_weight"].T
    model = OneNodeModel("DecodeBlock", BLOCK_IN, BLOCK_OUT, t_names, dtype, epsilon=1e-5)
    feeds = {k_: as_feed(v, dtype) if k_ in t_names else v.float().numpy() for k_, v in x.items()}
    shapes = {"out": (b, 1, d), "residual_out": (b, 1, d), "conv_state_out": (b, e, k - 1), "ssm_state_out": (b, e, n)}
    return model, feeds, shapes, (out_ref, res, conv_ref, ssm_ref)


@pytest.mark.parametrize("dtype,rdtype", NORM_TYPES, ids=lambda v: v)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_block_matches_reference(shape, dtype, rdtype):
    model, feeds, shapes, (out_ref, res_ref, conv_ref, ssm_ref) = block_case(*shape, dtype, rdtype,
                                                                            seed_of(shape, dtype, rdtype))
    out, res, conv, ssm = model.run(feeds, shapes)
    assert rel_err(out[:, 0], out_ref) < BLOCK_TOL[dtype]
    np.testing.assert_array_equal(res[:, 0].astype(np.float64), res_ref.numpy())
    # The states follow xz, which the reference rounds to T itself: a rounding that lands on the other side moves
    # them by one ulp of T.
    state_tol = STATE_TOL if dtype == "float32" else BLOCK_TOL[dtype]
    if conv.size:
        assert rel_err(conv, conv_ref) < state_tol
    assert rel_err(ssm, ssm_ref) < state_tol


BLOCK_PATHS = ["auto", "split", "unfolded"]  # MAMBA_EXPORT_CUDA_DECODE_BLOCK; kernels/cuda/decode_block.cu


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[0], BLOCK_SHAPES[3], BLOCK_SHAPES[4], BLOCK_SHAPES[7]],
                         ids=lambda s: "x".join(map(str, s)))
def test_decode_block_paths_agree_bit_for_bit(shape, dtype, monkeypatch):
    """The fused kernel (with its tagged exchange, with its own grid barrier, and with cooperative groups' one), one
    kernel per phase, and the unfolded reduction give identical bits (no atomics, sums in orders fixed by the sizes),
    and so do repeated runs (each launch of the tagged exchange with a new tag): needed for identical tokens with CUDA
    graphs on and off."""
    model, feeds, shapes, _ = block_case(*shape, dtype, "float32", seed=7)
    runs = []
    for path in ("auto", "auto", "cg-barrier", "barrier", "auto", "auto", "split", "unfolded"):
        monkeypatch.setenv("MAMBA_EXPORT_CUDA_CG_BARRIER", "1" if path == "cg-barrier" else "0")
        monkeypatch.setenv("MAMBA_EXPORT_CUDA_TAGGED", "0" if path in ("cg-barrier", "barrier") else "1")
        if path in ("auto", "cg-barrier", "barrier"):
            monkeypatch.delenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", raising=False)
        else:
            monkeypatch.setenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", path)
        runs.append(model.run(feeds, shapes))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[0], BLOCK_SHAPES[2], BLOCK_SHAPES[3], BLOCK_SHAPES[4]],
                         ids=lambda s: "x".join(map(str, s)))
def test_decode_block_one_residual_row_for_every_sequence(shape, dtype, monkeypatch):
    """A [1, 1, d] residual (layer 0's zero residual in a --decode-blocks export) is added to every sequence: the same
    bits as that row repeated over the batch, on every kernel path; and zeros give residual_out = x exactly."""
    model, feeds, shapes, _ = block_case(*shape, dtype, "float32", seed=11)
    b = feeds["x"].shape[0]
    row = feeds["residual"][:1]
    for path in BLOCK_PATHS:
        if path == "auto":
            monkeypatch.delenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", raising=False)
        else:
            monkeypatch.setenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", path)
        got = model.run({**feeds, "residual": row}, shapes)
        want = model.run({**feeds, "residual": np.repeat(row, b, axis=0)}, shapes)
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a, c)
        _, res, _, _ = model.run({**feeds, "residual": np.zeros_like(row)}, shapes)
        np.testing.assert_array_equal(res, feeds["x"].astype(np.float32))


BLOCK_WEIGHTS = ["norm_weight", "in_proj_weight", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight",
                 "dt_bias", "A", "D", "out_proj_weight"]


def chain_case(shape, dtype: str, n: int, seed: int):
    """n layers of block_case(shape) (seeds seed, seed + 1, ...): their weights, their (conv, ssm) states, the first
    layer's x and residual, and the output shapes."""
    layers, states = [], []
    for i in range(n):
        _, feeds, shapes, _ = block_case(*shape, dtype, "float32", seed=seed + i)
        layers.append({k: feeds[k] for k in BLOCK_WEIGHTS})
        states.append((feeds["conv_state_in"], feeds["ssm_state_in"]))
    return layers, states, feeds["x"], feeds["residual"], shapes


def block_node(dtype: str) -> OneNodeModel:
    """One DecodeBlock node with a float32 residual, every input a graph input (no early start)."""
    t_names = {"x", "norm_weight", "in_proj_weight", "out_proj_weight", "out"}
    return OneNodeModel("DecodeBlock", BLOCK_IN, BLOCK_OUT, t_names, dtype, epsilon=1e-5)


def block_chain_session(layers: list[dict[str, np.ndarray]], dtype: str) -> ort.InferenceSession:
    return gpu_session(block_chain_model(layers, dtype))


def block_chain_model(layers: list[dict[str, np.ndarray]], dtype: str):
    """A graph of len(layers) DecodeBlock nodes, each node's (out, residual_out) the next one's (x, residual), the
    weights constant initializers (which lets the CUDA kernel start before the previous node's has finished:
    kernels/cuda/decode_block.cu, "Early start"). Inputs x, residual, conv_i, ssm_i; outputs out, residual_out,
    conv_out_i, ssm_out_i."""
    t_type = ONNX_TYPE[dtype]
    inits, nodes = [], []
    x, res = "x", "residual"
    g_in = [helper.make_tensor_value_info("x", t_type, None),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, None)]
    g_out = []
    for i, w in enumerate(layers):
        for name in BLOCK_WEIGHTS:
            kind = t_type if name in ("norm_weight", "in_proj_weight", "out_proj_weight") else TensorProto.FLOAT
            inits.append(helper.make_tensor(f"{name}_{i}", kind, w[name].shape, w[name].tobytes(), raw=True))
        g_in += [helper.make_tensor_value_info(f"conv_{i}", TensorProto.FLOAT, None),
                 helper.make_tensor_value_info(f"ssm_{i}", TensorProto.FLOAT, None)]
        last = i == len(layers) - 1
        out, res_out = ("out", "residual_out") if last else (f"out_{i}", f"residual_out_{i}")
        ins = [x, res, f"norm_weight_{i}", f"in_proj_weight_{i}", f"conv_{i}", f"ssm_{i}"] + [
            f"{name}_{i}" for name in BLOCK_WEIGHTS[2:]]
        nodes.append(helper.make_node("DecodeBlock", ins, [out, res_out, f"conv_out_{i}", f"ssm_out_{i}"],
                                      domain=DOMAIN, epsilon=1e-5))
        g_out += [helper.make_tensor_value_info(f"conv_out_{i}", TensorProto.FLOAT, None),
                  helper.make_tensor_value_info(f"ssm_out_{i}", TensorProto.FLOAT, None)]
        x, res = out, res_out
    g_out = [helper.make_tensor_value_info("out", t_type, None),
             helper.make_tensor_value_info("residual_out", TensorProto.FLOAT, None)] + g_out
    model = helper.make_model(helper.make_graph(nodes, "chain", g_in, g_out, inits), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    return model


def gpu_session(model) -> ort.InferenceSession:
    """A session of ``model`` (an onnx ModelProto) with the library, every node on the CUDA provider."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(library())
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [BLOCK_SHAPES[0], BLOCK_SHAPES[3], BLOCK_SHAPES[2]],
                         ids=lambda s: "x".join(map(str, s)))
def test_decode_block_chain_early_start_is_exact(shape, dtype, monkeypatch):
    """Four chained DecodeBlock nodes with constant weights (at batch 1 their kernels start before the previous
    node's has finished, on sm_90+), against the same four layers run one node at a time with the weights as graph
    inputs (no early start): identical bits, also with the early start turned off (MAMBA_EXPORT_CUDA_PDL=0) and over
    repeated runs. A layer that read x or the residual before the previous layer had written them would differ."""
    layers, states, x0, res0, shapes = chain_case(shape, dtype, 4, seed=20)
    single = block_node(dtype)
    x, res, want_states = x0, res0, []
    for w, (conv, ssm) in zip(layers, states):
        step = {"x": x, "residual": res, "conv_state_in": conv, "ssm_state_in": ssm, **w}
        x, res, conv_out, ssm_out = single.run(step, shapes)
        want_states += [conv_out, ssm_out]
    want = [x, res, *want_states]
    sess = block_chain_session(layers, dtype)
    feeds = {"x": x0, "residual": res0}
    for i, (conv, ssm) in enumerate(states):
        feeds[f"conv_{i}"], feeds[f"ssm_{i}"] = conv, ssm
    for pdl in (None, None, "0", None):
        if pdl is None:
            monkeypatch.delenv("MAMBA_EXPORT_CUDA_PDL", raising=False)
        else:
            monkeypatch.setenv("MAMBA_EXPORT_CUDA_PDL", pdl)
        got = sess.run(None, feeds)
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a.reshape(c.shape), c)


def test_decode_block_chain_of_mixed_shapes_on_one_stream(monkeypatch):
    """Batch-1 layers of three inner sizes interleaved in one graph (one stream, the same grid of 96 blocks): the fused
    kernel's tagged exchange keeps a buffer and a launch count per (stream, grid, sizes), so each launch waits for
    its own shape's words. The bits of the layers run one node at a time (and of the fused kernel's barriers), over
    repeated runs; a shared buffer or count would hang (trap) or mix the layers' words."""
    monkeypatch.delenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", raising=False)
    monkeypatch.delenv("MAMBA_EXPORT_CUDA_TAGGED", raising=False)
    wide, mid, narrow = BLOCK_SHAPES[0], (1, 768, 1024, 16, 4, 32), (1, 768, 512, 16, 4, 16)
    order = [wide, mid, wide, narrow, mid, narrow]
    layers, feeds, single_shapes = [], {}, []
    for i, shape in enumerate(order):
        _, case, out_shapes, _ = block_case(*shape, "float16", "float32", seed=60 + i)
        layers.append({k: case[k] for k in BLOCK_WEIGHTS})
        feeds[f"conv_{i}"], feeds[f"ssm_{i}"] = case["conv_state_in"], case["ssm_state_in"]
        single_shapes.append(out_shapes)
        if i == 0:
            feeds["x"], feeds["residual"] = case["x"], case["residual"]
    single = block_node("float16")
    x, res, want_states = feeds["x"], feeds["residual"], []
    for i, (w, out_shapes) in enumerate(zip(layers, single_shapes)):
        step = {"x": x, "residual": res, "conv_state_in": feeds[f"conv_{i}"], "ssm_state_in": feeds[f"ssm_{i}"], **w}
        x, res, conv_out, ssm_out = single.run(step, out_shapes)
        want_states += [conv_out, ssm_out]
    want = [x, res, *want_states]
    sess = block_chain_session(layers, "float16")
    for tagged in ("1", "1", "0", "1"):
        monkeypatch.setenv("MAMBA_EXPORT_CUDA_TAGGED", tagged)
        got = sess.run(None, feeds)
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a.reshape(c.shape), c)


def test_decode_block_sessions_on_two_streams_run_side_by_side():
    """The fused kernel's grid-barrier word is one per stream: two sessions (each on its own stream) running chains of
    fused DecodeBlock nodes from two threads at once give the bits of a run alone, and neither hangs."""
    import threading

    layers, feeds = [], {}
    for i in range(4):
        _, case, _, _ = block_case(*BLOCK_SHAPES[0], "float16", "float32", seed=40 + i)
        layers.append({k: case[k] for k in BLOCK_WEIGHTS})
        feeds[f"conv_{i}"], feeds[f"ssm_{i}"] = case["conv_state_in"], case["ssm_state_in"]
    feeds["x"], feeds["residual"] = case["x"], case["residual"]
    sessions = [block_chain_session(layers, "float16") for _ in range(2)]
    want = sessions[0].run(None, feeds)
    results: list[list] = [[], []]

    def work(k: int) -> None:
        for _ in range(40):
            results[k].append(sessions[k].run(None, feeds))

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a DecodeBlock chain hung"
    assert [len(r) for r in results] == [40, 40]
    for got in results[0] + results[1]:
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a, c)


def assert_clear_errors(model: OneNodeModel, feeds: dict, shapes: dict, cases: list[tuple[dict, str]]) -> None:
    """Each (inputs replaced, message pattern) case fails with that message, not a crash."""
    for replaced, pattern in cases:
        with pytest.raises(Exception, match=pattern):
            model.run({**feeds, **{k: np.zeros(shape, np.float32) for k, shape in replaced.items()}}, shapes)


def test_decode_block_bad_inputs_are_clear_errors():
    model, feeds, shapes, _ = block_case(2, 16, 32, 4, 4, 2, "float32", "float32", seed=1)
    assert_clear_errors(model, feeds, shapes, [
        ({"out_proj_weight": (16, 31)}, r"DecodeBlock \(CUDA\): input 'out_proj_weight' must have shape \[16, 32\]"),
        ({"in_proj_weight": (63, 16)}, r"DecodeBlock \(CUDA\): input 'in_proj_weight' must have an even first"),
        ({"residual": (2, 1, 15)}, r"DecodeBlock \(CUDA\): input 'residual' must have shape \[2, 1, 16\]"),
    ])


# ---- DecodeHead ------------------------------------------------------------------------------------------------
HEAD_IN = {"x": 3, "residual": 3, "norm_weight": 1, "weight": 2}
HEAD_SHAPES = [  # b, d, V
    (1, 768, 50280),    # mamba-130m's head at batch 1 (the NB = 1 build)
    (1, 2048, 5003),    # mamba-1.4b's width
    (8, 768, 1001),     # one full group
    (3, 100, 333),      # a partial group; d not a multiple of 8 (scalar float16 loads)
    (64, 256, 777),     # eight groups
    (2, 2600, 500),     # d beyond one 2048-value chunk
    (5, 37, 97),        # odd d
]


def head_case(b, d, vocab, dtype, rdtype, seed):
    """(model, feeds, output shapes, logits reference in float64) for one DecodeHead node: the reference rounds the
    residual sum to R and h to T as the op does, in float64 otherwise."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = {"x": r(b, 1, d), "residual": 2 * r(b, 1, d), "norm_weight": 1 + 0.2 * r(d), "weight": r(vocab, d) / d ** 0.5}
    t_names = {"x", "norm_weight", "weight", "logits"} | ({"residual"} if rdtype != "float32" else set())
    t = {k: (rounded(v, dtype) if k in t_names else v.float().double()) for k, v in x.items()}
    res = (t["residual"].float() + t["x"].float()).to(getattr(torch, rdtype)).double()[:, 0]
    h = rounded(res / torch.sqrt(res.pow(2).mean(-1, keepdim=True) + 1e-5) * t["norm_weight"], dtype)
    model = OneNodeModel("DecodeHead", HEAD_IN, {"logits": 3}, t_names, dtype, epsilon=1e-5)
    feeds = {k: as_feed(v, dtype) if k in t_names else v.float().numpy() for k, v in x.items()}
    return model, feeds, {"logits": (b, 1, vocab)}, h @ t["weight"].T


@pytest.mark.parametrize("dtype,rdtype", NORM_TYPES, ids=lambda v: v)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_head_matches_reference(shape, dtype, rdtype):
    model, feeds, shapes, ref = head_case(*shape, dtype, rdtype, seed_of(shape, dtype, rdtype))
    (logits,) = model.run(feeds, shapes)
    assert rel_err(logits[:, 0], ref) < Y_TOL[dtype]
    again = model.run(feeds, shapes)[0]
    np.testing.assert_array_equal(again, logits)  # no atomics: the same bits every run


def test_decode_head_after_blocks_early_start_is_exact(monkeypatch):
    """DecodeBlock -> DecodeBlock -> DecodeHead with constant weights (the head's kernel starts, and loads its rows,
    while the last block runs, on sm_90+) against the same nodes run one at a time: identical bits, also with the early
    start off. A head that read x or the residual before the last block had written them would differ."""
    dtype, shape = "float16", BLOCK_SHAPES[0]
    layers, states, x0, res0, shapes = chain_case(shape, dtype, 2, seed=60)
    head, head_feeds, head_shapes, _ = head_case(1, shape[1], 50280, dtype, "float32", seed=62)
    single = block_node(dtype)
    x, res = x0, res0
    for w, (conv, ssm) in zip(layers, states):
        x, res, _, _ = single.run({"x": x, "residual": res, "conv_state_in": conv, "ssm_state_in": ssm, **w}, shapes)
    want = head.run({**head_feeds, "x": x, "residual": res}, head_shapes)[0]

    graph = block_chain_model(layers, dtype)
    t_type = ONNX_TYPE[dtype]
    for name in ("norm_weight", "weight"):
        graph.graph.initializer.append(helper.make_tensor(f"head_{name}", t_type, head_feeds[name].shape,
                                                          head_feeds[name].tobytes(), raw=True))
    graph.graph.node.append(helper.make_node("DecodeHead", ["out", "residual_out", "head_norm_weight", "head_weight"],
                                             ["logits"], domain=DOMAIN, epsilon=1e-5))
    graph.graph.output.insert(0, helper.make_tensor_value_info("logits", t_type, None))
    sess = gpu_session(graph)
    feeds = {"x": x0, "residual": res0}
    for i, (conv, ssm) in enumerate(states):
        feeds[f"conv_{i}"], feeds[f"ssm_{i}"] = conv, ssm
    for pdl in (None, "0", None):
        if pdl is None:
            monkeypatch.delenv("MAMBA_EXPORT_CUDA_PDL", raising=False)
        else:
            monkeypatch.setenv("MAMBA_EXPORT_CUDA_PDL", pdl)
        got = sess.run(["logits"], feeds)[0]
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_decode_head_bad_inputs_are_clear_errors():
    model, feeds, shapes, _ = head_case(2, 16, 50, "float32", "float32", seed=1)
    assert_clear_errors(model, feeds, shapes, [
        ({"weight": (50, 15)}, r"DecodeHead \(CUDA\): input 'weight' must have shape \[>=1, 16\]"),
        ({"residual": (3, 1, 16)}, r"DecodeHead \(CUDA\): input 'residual' must have shape \[2, 1, 16\]"),
        ({"x": (2, 2, 16), "residual": (2, 2, 16)}, r"DecodeHead \(CUDA\): input 'x' must have shape \[>=0, 1, >=0\]"),
    ])


# ---- validation ------------------------------------------------------------------------------------------------
def test_bad_shape_is_a_clear_error():
    b, l, e, n = 2, 5, 16, 4
    x = scan_inputs(b, l, e, n, seed=1)
    model = OneNodeModel("SelectiveScan", SCAN_IN, SCAN_OUT, SCAN_T, "float32")
    feeds = {k: v.float().numpy() for k, v in x.items()}
    feeds["ssm_state_in"] = np.zeros((b, e + 1, n), np.float32)
    with pytest.raises(Exception, match=r"SelectiveScan \(CUDA\): input 'ssm_state_in' must have shape \[2, 16, 4\]"):
        model.run(feeds, {"y": (b, l, e), "ssm_state_out": (b, e, n)})
    feeds["ssm_state_in"] = np.zeros((b, e, n), np.float32)
    feeds["D"] = np.zeros(e - 1, np.float32)
    with pytest.raises(Exception, match=r"SelectiveScan \(CUDA\): input 'D' must have shape \[16\] \(\[e\]\), found \[15\]"):
        model.run(feeds, {"y": (b, l, e), "ssm_state_out": (b, e, n)})


def test_unsupported_sizes_are_clear_errors():
    model = OneNodeModel("DecodeStep", STEP_IN, STEP_OUT, STEP_T, "float32")
    b, e, n, k, r_ = 1, 8, 300, 4, 2
    feeds = {"xz": np.zeros((b, 1, 2 * e), np.float32), "conv_state_in": np.zeros((b, e, k - 1), np.float32),
             "ssm_state_in": np.zeros((b, e, n), np.float32), "conv_weight": np.zeros((e, k), np.float32),
             "conv_bias": np.zeros(e, np.float32), "x_proj_weight": np.zeros((r_ + 2 * n, e), np.float32),
             "dt_proj_weight": np.zeros((e, r_), np.float32), "dt_bias": np.zeros(e, np.float32),
             "A": np.zeros((e, n), np.float32), "D": np.zeros(e, np.float32)}
    with pytest.raises(Exception, match=r"DecodeStep \(CUDA\): d_state 300 is outside"):
        model.run(feeds, {"y": (b, 1, e), "conv_state_out": (b, e, k - 1), "ssm_state_out": (b, e, n)})
    feeds["xz"] = np.zeros((b, 1, 2 * e + 1), np.float32)
    with pytest.raises(Exception, match=r"DecodeStep \(CUDA\): input 'xz' must have an even last dimension"):
        model.run(feeds, {"y": (b, 1, e), "conv_state_out": (b, e, k - 1), "ssm_state_out": (b, e, n)})
