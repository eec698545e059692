"""DecodeHead: the tail of a decode step (the final AddRMSNorm and the LM head) as one op, and the decode.onnx of
``--decode-blocks on`` exports, which ends with it.

The op, through onnxruntime with the library and through its model-local function (a stock onnxruntime), against a
float64 reference built from the reference model's own RMSNorm and the head's product, on the very T-rounded
inputs: batch 1, 3 and 64, d_model not a multiple of 8, V = 1001 and 5003 (neither a multiple of a task's 16 rows),
a mamba-130m-wide row (K past a 512-value chunk, several hundred tasks), T float32 and float16 with R float32 and
R = T. Tolerance policy (tests/test_decode_block.py's): the float64 reference rounds nothing, the op rounds h and
the logits to T, so the logits are held to TOL of T relative to max(1, max |ref|), float32 2e-5, float16 4e-3; and
no worse than 2x the same computation in plain PyTorch in that dtype (torch_ops.decode_head_cl), plus one unit of
T's rounding.

The exports: decode.onnx of a tied float32 and float16 model and of an untied float32 one ends with exactly one
DecodeHead on the last DecodeBlock's outputs; the head's weight is the embedding's initializer when tied, and no
transposed copy of the table is in decode.onnx; prefill then 16 steps match the float64 reference model. Invalid
inputs run in a subprocess, so a crash fails the test instead of killing pytest.

Run as a script with --bad-cases to print the outcome of every invalid-input case (what the subprocess does).
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from mamba_export import cli
from mamba_export.checkpoint import load_checkpoint
from mamba_export.export import onnx_ops, torch_ops
from mamba_export.model import RMSNorm
from support import (bad_case_tests, custom_node_model, decode_logits, export_config, library_built, make_hf_model,
                     op_session, outcome_of, reference_decode_logits, rel_err, save_transformers, scaled_error)

DOMAIN = onnx_ops.DOMAIN
TOL = {np.float32: 2e-5, np.float16: 4e-3}
ULP = {np.float32: 2.0**-24, np.float16: 2.0**-11}
INPUTS = [name for name, _ in onnx_ops._SIGNATURES["DecodeHead"][0]]
EPS = 1e-5

pytestmark = pytest.mark.skipif(not library_built(),
                                reason="custom-op library not built (bash tools/build_custom_ops.sh)")


# ---- the op alone -------------------------------------------------------------------------------------------------


def head_model(dtype, rdtype, overrides: dict | None = None, functions: bool = False,
               epsilon=EPS) -> onnx.ModelProto:
    return custom_node_model("DecodeHead", dtype, rdtype, overrides, functions, epsilon=epsilon)


@functools.lru_cache(maxsize=None)
def cached_session(dtype, rdtype, library: bool, threads: int = 2) -> ort.InferenceSession:
    return op_session(head_model(dtype, rdtype, functions=not library), library, threads)


def head_feeds(seed: int, dtype, rdtype, b: int, d: int, v: int) -> dict:
    """Random inputs of realistic scale: x, the norm's and the head's weights in T, the residual in R."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    return dict(x=f32(b, 1, d).astype(dtype), residual=f32(b, 1, d, scale=2.0).astype(rdtype),
                norm_weight=(1 + f32(d, scale=0.2)).astype(dtype), weight=f32(v, d, scale=d**-0.5).astype(dtype))


def head_reference(feeds: dict) -> torch.Tensor:
    """The logits in float64 from the reference model's RMSNorm: RMSNorm(residual + x) @ weight^T."""
    t = {name: torch.from_numpy(v.astype(np.float64)) for name, v in feeds.items()}
    norm = RMSNorm(t["x"].shape[-1], EPS).double()
    with torch.no_grad():
        norm.weight.copy_(t["norm_weight"])
        return norm(t["residual"] + t["x"]) @ t["weight"].t()


def check_head(seed, dtype, rdtype, b, d, v, library: bool) -> None:
    feeds = head_feeds(seed, dtype, rdtype, b, d, v)
    (got,) = cached_session(dtype, rdtype, library).run(None, feeds)
    want = head_reference(feeds)
    with torch.no_grad():
        plain = torch_ops.decode_head_cl(*(torch.from_numpy(feeds[name]) for name in INPUTS), EPS)
    assert got.dtype == dtype and got.shape == (b, 1, v)
    err = scaled_error(got, want)
    assert err <= TOL[dtype], f"{err:.3g}"
    bound = 2 * scaled_error(plain.numpy(), want) + ULP[dtype]
    assert err <= bound, f"{err:.3g} is over twice plain PyTorch's error in {dtype.__name__}"


TYPES = [(np.float32, np.float32), (np.float16, np.float32), (np.float16, np.float16)]
TYPE_IDS = ["f32", "f16_r32", "f16_r16"]
SHAPES = {  # (b, d, V)
    "batch1": (1, 64, 1001),
    "batch3_odd_d": (3, 37, 1001),
    "batch64": (64, 20, 1001),
    "mamba130m_wide": (2, 768, 5003),
}


@pytest.mark.parametrize("path", ["library", "function"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype,rdtype", TYPES, ids=TYPE_IDS)
def test_decode_head_matches_float64_reference(dtype, rdtype, shape, path):
    check_head(len(shape), dtype, rdtype, *SHAPES[shape], library=path == "library")


@pytest.mark.parametrize("dtype,rdtype", TYPES, ids=TYPE_IDS)
def test_rows_do_not_depend_on_batch_or_threads(dtype, rdtype):
    """Every row is computed in the same order whatever the batch and the thread count: bit for bit."""
    feeds = head_feeds(19, dtype, rdtype, 5, 200, 3001)  # 19 rows: the LM head goes chunk by chunk
    (batch,) = cached_session(dtype, rdtype, True).run(None, feeds)
    for i in (0, 4):
        (alone,) = cached_session(dtype, rdtype, True).run(
            None, {name: v[i:i + 1] if name in ("x", "residual") else v for name, v in feeds.items()})
        np.testing.assert_array_equal(alone, batch[i:i + 1])
    for threads in (1, 3):
        np.testing.assert_array_equal(cached_session(dtype, rdtype, True, threads).run(None, feeds)[0], batch)


# ---- invalid inputs -------------------------------------------------------------------------------------------------

# Valid shapes: b=2 d=8 V=11, float32. name -> (changes to the valid feeds, declared-dtype overrides, epsilon,
# strings the error must contain).
BAD_CASES = {
    "x_rank": ({"x": np.ones((2, 8), np.float32)}, {}, EPS, ["DecodeHead", "'x'", "rank 2", "rank 3"]),
    "x_two_tokens": ({"x": np.ones((2, 2, 8), np.float32)}, {}, EPS, ["'x'", "l=1"]),
    "empty_batch": ({"x": np.ones((0, 1, 8), np.float32), "residual": np.ones((0, 1, 8), np.float32)}, {}, EPS,
                    ["'x'", "b = 0"]),
    "empty_row": ({"x": np.ones((2, 1, 0), np.float32), "residual": np.ones((2, 1, 0), np.float32),
                   "norm_weight": np.ones(0, np.float32), "weight": np.ones((11, 0), np.float32)}, {}, EPS,
                  ["'x'", "d = 0"]),
    "residual_one_row": ({"residual": np.ones((1, 1, 8), np.float32)}, {}, EPS, ["'residual'", "b=2"]),
    "residual_width": ({"residual": np.ones((2, 1, 9), np.float32)}, {}, EPS, ["'residual'", "d=8"]),
    "norm_weight_width": ({"norm_weight": np.ones(9, np.float32)}, {}, EPS, ["'norm_weight'", "d=8"]),
    "weight_rank": ({"weight": np.ones(88, np.float32)}, {}, EPS, ["'weight'", "rank 1", "[V, d]"]),
    "weight_width": ({"weight": np.ones((11, 7), np.float32)}, {}, EPS, ["'weight'", "d=8"]),
    "weight_transposed": ({"weight": np.ones((8, 11), np.float32)}, {}, EPS, ["'weight'", "[8, 11]", "d=8"]),
    "empty_vocabulary": ({"weight": np.ones((0, 8), np.float32)}, {}, EPS, ["'weight'", "V = 0"]),
    "weight_float16": ({"weight": np.ones((11, 8), np.float16)}, {"weight": np.float16}, EPS, ["DecodeHead"]),
    "residual_float64": ({"residual": np.ones((2, 1, 8))}, {"residual": np.float64}, EPS, ["DecodeHead"]),
    "epsilon_negative": ({}, {}, -1e-5, ["DecodeHead", "epsilon", ">= 0"]),
}


def run_bad_case(name: str) -> dict:
    """Build and run one invalid case; report whether onnxruntime raised, and its message."""
    changes, overrides, epsilon, _ = BAD_CASES[name]
    feeds = {**head_feeds(0, np.float32, np.float32, 2, 8, 11), **changes}
    return outcome_of(
        lambda: op_session(head_model(np.float32, np.float32, overrides, epsilon=epsilon)).run(None, feeds))


(bad_case_outcomes, test_invalid_input_is_an_onnxruntime_error,
 test_bad_case_subprocess_exits_cleanly) = bad_case_tests(__file__, BAD_CASES, lambda case: case[-1])


# ---- exports --------------------------------------------------------------------------------------------------------

EXPORTS = {  # name -> (make_hf_model overrides of the "tiny" config, --dtype)
    "tied_float32": ({}, "float32"),
    "tied_float16": ({}, "float16"),
    "untied_float32": ({"tie_word_embeddings": False}, "float32"),
}
VOCAB = 1001  # no other dimension of the "tiny" model (256 is its 2 d_inner)


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def export(request, tmp_path_factory):
    """(name, checkpoint dir, export dir): the case's model exported with --decode-blocks on."""
    overrides, dtype = EXPORTS[request.param]
    root = tmp_path_factory.mktemp(f"decode-head-{request.param}")
    ckpt = save_transformers(make_hf_model("tiny", seed=4, vocab_size=VOCAB, **overrides), root / "ckpt")
    out = root / "out"
    assert cli.main(["export", str(ckpt), "-o", str(out), "--dtype", dtype, "--decode-blocks", "on"]) == 0
    return request.param, ckpt, out


def decode_graph(out) -> onnx.GraphProto:
    return onnx.load(str(out / "decode.onnx"), load_external_data=False).graph


def test_decode_graph_ends_with_one_decode_head(export):
    """After the last DecodeBlock only the DecodeHead: on that block's out and residual_out, with norm_f's weight
    and epsilon, writing the graph's logits; no AddRMSNorm, MatMul or Gemm anywhere in the graph."""
    _, _, out = export
    cfg = export_config(out)
    graph = decode_graph(out)
    ops = [n.op_type for n in graph.node]
    assert ops.count("DecodeHead") == 1 and ops.count("DecodeBlock") == cfg.n_layer
    assert not {"AddRMSNorm", "RMSNorm", "MatMul", "Gemm"} & set(ops)
    last_block = max(i for i, op in enumerate(ops) if op == "DecodeBlock")
    assert ops[last_block + 1:] == ["DecodeHead"]
    block, head = graph.node[last_block], graph.node[-1]
    assert head.domain == DOMAIN and list(head.input[:2]) == list(block.output[:2])
    assert list(head.output) == ["logits"] == [graph.output[0].name]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert attrs["epsilon"] == pytest.approx(cfg.norm_eps)
    norm_f = {t.name: t for t in graph.initializer}[head.input[2]]
    assert list(norm_f.dims) == [cfg.d_model]
    assert "DecodeHead" in json.loads((out / "manifest.json").read_text())["ops"]["names"]


def test_head_weight_is_the_embedding_initializer_when_tied(export):
    """The head's weight is the [V, d] matrix, one initializer: the Gather's table when tied, the LM head's own when
    not; decode.onnx holds no [d, V] (transposed) copy of it."""
    name, ckpt, out = export
    cfg = export_config(out)
    graph = decode_graph(out)
    (gather,) = [n for n in graph.node if n.op_type == "Gather"]
    (head,) = [n for n in graph.node if n.op_type == "DecodeHead"]
    initializers = {t.name: t for t in graph.initializer}
    table, weight = initializers[gather.input[0]], initializers[head.input[3]]
    assert list(table.dims) == list(weight.dims) == [cfg.vocab_size, cfg.d_model]
    assert (head.input[3] == gather.input[0]) is name.startswith("tied")
    vocab_sized = [t.name for t in graph.initializer if cfg.vocab_size in t.dims]
    assert sorted(vocab_sized) == sorted({gather.input[0], head.input[3]})
    if name.startswith("untied"):  # the LM head's own matrix, not the table's
        stored = numpy_helper.to_array(weight, base_dir=str(out))
        np.testing.assert_array_equal(stored, load_checkpoint(ckpt).lm_head.weight.detach().numpy())


@pytest.mark.parametrize("how", ["library", "function"])
def test_prefill_then_16_steps_match_reference(export, how):
    name, ckpt, out = export
    ref = load_checkpoint(ckpt, dtype=torch.float64)
    prompt = 5
    ids = torch.randint(0, ref.config.vocab_size, (2, prompt + 16), generator=torch.Generator().manual_seed(5))
    got = decode_logits(out, ids, prompt, library=how == "library")
    tol = 1e-2 if name.endswith("float16") else 1e-4  # the other export tests' bounds against float64
    assert rel_err(torch.from_numpy(got), reference_decode_logits(ref, ids, prompt)) <= tol


if __name__ == "__main__" and sys.argv[1:] == ["--bad-cases"]:
    for case in sorted(BAD_CASES):
        print(json.dumps({case: run_bad_case(case)}), flush=True)
