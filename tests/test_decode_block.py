"""DecodeBlock: one whole decode layer (AddRMSNorm -> in_proj -> DecodeStep -> out_proj) as one op.

The op, through onnxruntime with the library and through its model-local function (a stock onnxruntime), against a
float64 reference built from the reference model's own modules (RMSNorm and MambaMixer.step with the case's weights),
on the very T-rounded inputs: batch 1, 3 and 64, d_model not a multiple of 8, a mamba-130m-sized layer (several
tasks per projection, K past a 512-value chunk), T float32 and float16 with R float32 and R = T. Tolerance policy: the
float64 reference rounds nothing, the op rounds h, xz, y and out to T (and the residual to R), so each output is
held to TOL of its dtype relative to max(1, max |ref|): float32 2e-5 (a few thousand-term float32 sums), float16
4e-3 (8 units of float16 rounding, 2^-11, for four roundings in a row); and no worse than 2x the same computation in
plain PyTorch in that dtype (torch_ops.decode_block_cl), plus one unit of the dtype's rounding.

Invalid inputs run in a subprocess, so a crash fails the test instead of killing pytest.

Run as a script with --bad-cases to print the outcome of every invalid-input case (what the subprocess does).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mamba_export.backends import REFERENCE
from mamba_export.config import MambaConfig
from mamba_export.export import onnx_ops, torch_ops
from mamba_export.model import RMSNorm
from support import bad_case_tests, float64_mixer, library_built, op_session, outcome_of

DOMAIN = "ai.mamba_export"
ROOT = Path(__file__).resolve().parents[1]
ONNX_DTYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}
TOL = {np.float32: 2e-5, np.float16: 4e-3}
ULP = {np.float32: 2.0**-24, np.float16: 2.0**-11}
SIGNATURE = onnx_ops._SIGNATURES["DecodeBlock"]
EPS = 1e-5

pytestmark = pytest.mark.skipif(not library_built(),
                                reason="custom-op library not built (bash tools/build_custom_ops.sh)")


# ---- the op alone -------------------------------------------------------------------------------------------------


def block_model(dtype, rdtype, overrides: dict | None = None, functions: bool = False) -> onnx.ModelProto:
    """One DecodeBlock node whose inputs and outputs are graph I/O of unknown shape (only the op checks shapes);
    ``overrides`` declares other dtypes for some inputs."""
    declared = lambda kind: ONNX_DTYPE[dtype if kind == "T" else rdtype if kind == "R" else np.float32]  # noqa: E731
    overrides = overrides or {}
    inputs = [helper.make_tensor_value_info(n, ONNX_DTYPE[overrides[n]] if n in overrides else declared(k), None)
              for n, k in SIGNATURE[0]]
    outputs = [helper.make_tensor_value_info(n, declared(k), None) for n, k in SIGNATURE[1]]
    node = helper.make_node("DecodeBlock", [n for n, _ in SIGNATURE[0]], [n for n, _ in SIGNATURE[1]], domain=DOMAIN,
                            epsilon=EPS)
    opsets = [helper.make_opsetid("", onnx_ops.OPSET), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(helper.make_graph([node], "decode_block", inputs, outputs), opset_imports=opsets,
                              ir_version=10)
    if functions:
        model.functions.extend(onnx_ops.model_functions())
    return model


@functools.lru_cache(maxsize=None)
def cached_session(dtype, rdtype, library: bool, threads: int = 2) -> ort.InferenceSession:
    return op_session(block_model(dtype, rdtype, functions=not library), library, threads)


def block_feeds(seed: int, dtype, rdtype, b: int, d: int, e: int, n: int, k: int, r: int) -> dict:
    """Random inputs of realistic scale: activations and matrices in T, the residual in R, the rest float32."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return dict(
        x=f32(b, 1, d).astype(dtype), residual=f32(b, 1, d, scale=2.0).astype(rdtype),
        norm_weight=(1 + f32(d, scale=0.2)).astype(dtype), in_proj_weight=f32(2 * e, d, scale=d**-0.5).astype(dtype),
        conv_state_in=f32(b, e, k - 1), ssm_state_in=f32(b, e, n), conv_weight=f32(e, k, scale=0.5),
        conv_bias=f32(e, scale=0.2), x_proj_weight=f32(r + 2 * n, e, scale=e**-0.5),
        dt_proj_weight=f32(e, r, scale=r**-0.5), dt_bias=f32(e, scale=0.5),
        A=-np.exp(rng.uniform(-1.0, 1.5, (e, n))).astype(np.float32), D=f32(e),
        out_proj_weight=f32(d, e, scale=e**-0.5).astype(dtype),
    )


def block_reference(feeds: dict) -> list[torch.Tensor]:
    """The layer in float64 from the reference model's modules: residual_out = residual + x; h = RMSNorm(residual_out);
    MambaMixer.step(h) with the case's weights -> out, residual_out, conv_state_out, ssm_state_out."""
    t = {name: torch.from_numpy(v.astype(np.float64)) for name, v in feeds.items()}
    e, d = t["in_proj_weight"].shape[0] // 2, t["x"].shape[-1]
    n, k, r = t["A"].shape[1], t["conv_weight"].shape[1], t["dt_proj_weight"].shape[1]
    cfg = MambaConfig(d_model=d, n_layer=1, vocab_size=8, d_state=n, d_conv=k, expand=e // d, dt_rank=r)
    assert cfg.d_inner == e
    mixer, norm = float64_mixer(cfg, t), RMSNorm(d, EPS).double()
    with torch.no_grad():
        norm.weight.copy_(t["norm_weight"])
        residual = t["residual"] + t["x"]
        out, conv, ssm = mixer.step(norm(residual)[:, 0], t["conv_state_in"], t["ssm_state_in"], REFERENCE)
    return [out.unsqueeze(1), residual, conv, ssm]


def scaled_error(got: np.ndarray, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|)."""
    want = want.numpy()
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max()))


def check_block(seed, dtype, rdtype, b, d, e, n, k, r, library: bool) -> None:
    feeds = block_feeds(seed, dtype, rdtype, b, d, e, n, k, r)
    got = cached_session(dtype, rdtype, library).run(None, feeds)
    want = block_reference(feeds)
    with torch.no_grad():
        plain = torch_ops.decode_block_cl(*(torch.from_numpy(feeds[name]) for name, _ in SIGNATURE[0]), EPS)
    for (name, kind), out, ref, same_dtype in zip(SIGNATURE[1], got, want, plain):
        dt = {"T": dtype, "R": rdtype}.get(kind, np.float32)
        assert out.dtype == dt and out.shape == tuple(ref.shape), name
        err = scaled_error(out, ref)
        assert err <= TOL[dt if kind != "F" else dtype], f"{name}: {err:.3g}"
        bound = 2 * scaled_error(same_dtype.numpy(), ref) + ULP[dt]
        assert err <= bound, f"{name}: {err:.3g} is over twice plain PyTorch's error in {dt.__name__}"


TYPES = [(np.float32, np.float32), (np.float16, np.float32), (np.float16, np.float16)]
SHAPES = {  # (b, d, e, n, k, r)
    "batch1": (1, 64, 128, 16, 4, 4),
    "batch3_odd_d": (3, 37, 74, 8, 3, 5),
    "batch64": (64, 20, 40, 4, 2, 3),
    "mamba130m": (2, 768, 1536, 16, 4, 48),
}


@pytest.mark.parametrize("path", ["library", "function"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype,rdtype", TYPES, ids=["f32", "f16_r32", "f16_r16"])
def test_decode_block_matches_float64_reference(dtype, rdtype, shape, path):
    check_block(len(shape), dtype, rdtype, *SHAPES[shape], library=path == "library")


@pytest.mark.parametrize("dtype,rdtype", TYPES, ids=["f32", "f16_r32", "f16_r16"])
def test_rows_do_not_depend_on_batch_or_threads(dtype, rdtype):
    """Every row is computed in the same order whatever the batch and the thread count: bit for bit."""
    feeds = block_feeds(9, dtype, rdtype, 5, 200, 400, 16, 4, 13)
    batch = cached_session(dtype, rdtype, True).run(None, feeds)
    row_inputs = {"x", "residual", "conv_state_in", "ssm_state_in"}
    for i in (0, 4):
        alone = cached_session(dtype, rdtype, True).run(
            None, {name: v[i:i + 1] if name in row_inputs else v for name, v in feeds.items()})
        for a, full in zip(alone, batch):
            np.testing.assert_array_equal(a, full[i:i + 1])
    for threads in (1, 3):
        for a, full in zip(cached_session(dtype, rdtype, True, threads).run(None, feeds), batch):
            np.testing.assert_array_equal(a, full)


# ---- invalid inputs -------------------------------------------------------------------------------------------------

# Valid shapes: b=2 d=8 e=5 n=4 k=4 r=3, float32. name -> (changes to the valid feeds, declared-dtype overrides,
# strings the error must contain).
BAD_CASES = {
    "x_rank": ({"x": np.ones((2, 8), np.float32)}, {}, ["DecodeBlock", "'x'", "rank 2", "rank 3"]),
    "x_two_tokens": ({"x": np.ones((2, 2, 8), np.float32)}, {}, ["'x'", "l=1"]),
    "empty_batch": ({"x": np.ones((0, 1, 8), np.float32), "residual": np.ones((0, 1, 8), np.float32)}, {},
                    ["'x'", "b = 0"]),
    "residual_batch": ({"residual": np.ones((3, 1, 8), np.float32)}, {}, ["'residual'", "b=2"]),
    "norm_weight_width": ({"norm_weight": np.ones(9, np.float32)}, {}, ["'norm_weight'", "d=8"]),
    "in_proj_odd": ({"in_proj_weight": np.ones((11, 8), np.float32)}, {}, ["'in_proj_weight'", "2e=10"]),
    "in_proj_width": ({"in_proj_weight": np.ones((10, 7), np.float32)}, {}, ["'in_proj_weight'", "d=8"]),
    "in_proj_rank": ({"in_proj_weight": np.ones((10, 8, 1), np.float32)}, {}, ["'in_proj_weight'", "rank 3"]),
    "out_proj_channels": ({"out_proj_weight": np.ones((8, 6), np.float32)}, {}, ["'out_proj_weight'", "e=5"]),
    "out_proj_rows": ({"out_proj_weight": np.ones((9, 5), np.float32)}, {}, ["'out_proj_weight'", "d=8"]),
    "conv_state_width": ({"conv_state_in": np.ones((2, 5, 4), np.float32)}, {}, ["'conv_state_in'", "k-1=3"]),
    "ssm_state_batch": ({"ssm_state_in": np.ones((1, 5, 4), np.float32)}, {}, ["'ssm_state_in'", "b=2"]),
    "x_proj_rows": ({"x_proj_weight": np.ones((10, 5), np.float32)}, {}, ["'x_proj_weight'", "r+2n=11"]),
    "A_rank": ({"A": -np.ones(20, np.float32)}, {}, ["'A'", "rank 1"]),
    "D_channels": ({"D": np.ones(6, np.float32)}, {}, ["'D'", "e=5"]),
    "state_float16": ({"ssm_state_in": np.ones((2, 5, 4), np.float16)}, {"ssm_state_in": np.float16},
                      ["DecodeBlock"]),
    "out_proj_float16": ({"out_proj_weight": np.ones((8, 5), np.float16)}, {"out_proj_weight": np.float16},
                         ["DecodeBlock"]),
    "x_float64": ({"x": np.ones((2, 1, 8))}, {"x": np.float64}, ["DecodeBlock"]),
}


def run_bad_case(name: str) -> dict:
    """Build and run one invalid case; report whether onnxruntime raised, and its message."""
    changes, overrides, _ = BAD_CASES[name]
    feeds = {**block_feeds(0, np.float32, np.float32, 2, 8, 5, 4, 4, 3), **changes}
    return outcome_of(lambda: op_session(block_model(np.float32, np.float32, overrides)).run(None, feeds))


(bad_case_outcomes, test_invalid_input_is_an_onnxruntime_error,
 test_bad_case_subprocess_exits_cleanly) = bad_case_tests(__file__, BAD_CASES, lambda case: case[2])


if __name__ == "__main__" and sys.argv[1:] == ["--bad-cases"]:
    for case in sorted(BAD_CASES):
        print(json.dumps({case: run_bad_case(case)}), flush=True)
