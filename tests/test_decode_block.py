"""DecodeBlock: one whole decode layer (AddRMSNorm -> in_proj -> DecodeStep -> out_proj) as one op, and exports with
``--decode-blocks``.

The op, through onnxruntime with the library and through its model-local function (a stock onnxruntime), against a
float64 reference built from the reference model's own modules (RMSNorm and MambaMixer.step with the case's weights),
on the very T-rounded inputs: batch 1, 3 and 64, d_model not a multiple of 8, a mamba-130m-sized layer (several
tasks per projection, K past a 512-value chunk), T float32 and float16 with R float32 and R = T. Tolerance policy: the
float64 reference rounds nothing, the op rounds h, xz, y and out to T (and the residual to R), so each output is
held to TOL of its dtype relative to max(1, max |ref|): float32 2e-5 (a few thousand-term float32 sums), float16
4e-3 (8 units of float16 rounding, 2^-11, for four roundings in a row); and no worse than 2x the same computation in
plain PyTorch in that dtype (torch_ops.decode_block_cl), plus one unit of the dtype's rounding (3x for the function,
which runs on onnxruntime's stock kernels: see check_block).

The exports (the "tiny" config, float16 and float32): decode.onnx with DecodeBlock nodes (and the DecodeHead that
tests/test_decode_head.py checks further), after a prefill through model.onnx, for 64 steps against decode.onnx
without them and against the float64 reference model; greedy tokens identical. Invalid inputs run in a subprocess, so a crash fails the test instead of killing pytest.

Run as a script with --bad-cases to print the outcome of every invalid-input case (what the subprocess does).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mamba_export import cli
from mamba_export.backends import REFERENCE
from mamba_export.checkpoint import load_checkpoint
from mamba_export.config import MambaConfig
from mamba_export.export import ExportError, export_checkpoint, onnx_ops, torch_ops
from mamba_export.export.api import resolve_decode_blocks
from mamba_export.model import RMSNorm
from support import (bad_case_tests, cli_refusal, custom_node_model, decode_logits, export_config, float64_mixer,
                     graph_session, library_built, make_hf_model, op_session, outcome_of, reference_decode_logits,
                     rel_err, run_graph, save_transformers, scaled_error, zero_state)

DOMAIN = "ai.mamba_export"
ROOT = Path(__file__).resolve().parents[1]
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
    return custom_node_model("DecodeBlock", dtype, rdtype, overrides, functions, epsilon=EPS)


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


def check_block(seed, dtype, rdtype, b, d, e, n, k, r, library: bool) -> None:
    feeds = block_feeds(seed, dtype, rdtype, b, d, e, n, k, r)
    got = cached_session(dtype, rdtype, library).run(None, feeds)
    want = block_reference(feeds)
    with torch.no_grad():
        plain = torch_ops.decode_block_cl(*(torch.from_numpy(feeds[name]) for name, _ in SIGNATURE[0]), EPS)
    # The library's kernels are ours: at most 2x plain PyTorch's error. The function runs on onnxruntime's stock
    # kernels, whose float32 arithmetic (MLAS) follows the host's instruction set: on an AVX-512 CI host (2026-11-26,
    # onnxruntime 1.23-1.32 alike) its ssm_state_out at mamba130m f32 came out at 2.25x PyTorch's error (9.6e-7
    # against 4.3e-7), where earlier hosts passed 2x; it is held to 3x (and to TOL like the library).
    factor = 2 if library else 3
    for (name, kind), out, ref, same_dtype in zip(SIGNATURE[1], got, want, plain):
        dt = {"T": dtype, "R": rdtype}.get(kind, np.float32)
        assert out.dtype == dt and out.shape == tuple(ref.shape), name
        err = scaled_error(out, ref)
        assert err <= TOL[dt if kind != "F" else dtype], f"{name}: {err:.3g}"
        bound = factor * scaled_error(same_dtype.numpy(), ref) + ULP[dt]
        assert err <= bound, f"{name}: {err:.3g} is over {factor}x plain PyTorch's error in {dt.__name__}"


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
    feeds = block_feeds(19, dtype, rdtype, 5, 200, 400, 16, 4, 13)  # 19 rows: the products go chunk by chunk
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


@pytest.mark.parametrize("path", ["library", "function"])
@pytest.mark.parametrize("dtype,rdtype", TYPES, ids=["f32", "f16_r32", "f16_r16"])
def test_one_residual_row_is_added_to_every_sequence(dtype, rdtype, path):
    """A [1, 1, d] residual (layer 0's zero residual in a --decode-blocks export): the same bits as that row repeated
    over the batch; zeros give residual_out = x exactly."""
    feeds = block_feeds(4, dtype, rdtype, 3, 40, 80, 8, 4, 5)
    sess = cached_session(dtype, rdtype, path == "library")
    row = feeds["residual"][:1]
    got = sess.run(None, {**feeds, "residual": row})
    want = sess.run(None, {**feeds, "residual": np.repeat(row, 3, axis=0)})
    for a, c in zip(got, want):
        np.testing.assert_array_equal(a, c)
    residual_out = sess.run(None, {**feeds, "residual": np.zeros_like(row)})[1]
    np.testing.assert_array_equal(residual_out, feeds["x"].astype(rdtype))


# ---- invalid inputs -------------------------------------------------------------------------------------------------

# Valid shapes: b=2 d=8 e=5 n=4 k=4 r=3, float32. name -> (changes to the valid feeds, declared-dtype overrides,
# strings the error must contain).
BAD_CASES = {
    "x_rank": ({"x": np.ones((2, 8), np.float32)}, {}, ["DecodeBlock", "'x'", "rank 2", "rank 3"]),
    "x_two_tokens": ({"x": np.ones((2, 2, 8), np.float32)}, {}, ["'x'", "l=1"]),
    "empty_batch": ({"x": np.ones((0, 1, 8), np.float32), "residual": np.ones((0, 1, 8), np.float32)}, {},
                    ["'x'", "b = 0"]),
    "residual_batch": ({"residual": np.ones((3, 1, 8), np.float32)}, {}, ["'residual'", "b (or 1)=2"]),
    "residual_batch_of_one_x": ({"x": np.ones((1, 1, 8), np.float32), "residual": np.ones((2, 1, 8), np.float32)}, {},
                                ["'residual'", "expected [b=1, l=1, d=8]"]),
    "norm_weight_width": ({"norm_weight": np.ones(9, np.float32)}, {}, ["'norm_weight'", "d=8"]),
    "in_proj_odd": ({"in_proj_weight": np.ones((11, 8), np.float32)}, {}, ["'in_proj_weight'", "2e (even)=10"]),
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


# ---- exports --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_transformers(make_hf_model("tiny", seed=2), tmp_path_factory.mktemp("decode-block") / "ckpt")


@pytest.fixture(scope="module", params=["float16", "float32"])
def exports(request, ckpt, tmp_path_factory):
    """(dtype, {"on": dir, "off": dir}) through the command line: --decode-blocks on, and without it: float16 with
    the default (auto, which is off for every export), float32 with --decode-blocks off."""
    root = tmp_path_factory.mktemp(f"decode-block-{request.param}")
    dtype = request.param
    flags = {"float16": {"on": ["--decode-blocks", "on"], "off": []},
             "float32": {"on": ["--decode-blocks", "on"], "off": ["--decode-blocks", "off"]}}[dtype]
    dirs = {}
    for mode, extra in flags.items():
        dirs[mode] = root / mode
        assert cli.main(["export", str(ckpt), "-o", str(dirs[mode]), "--dtype", dtype, *extra]) == 0
    return dtype, dirs


def greedy(out: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens through model.onnx then decode.onnx, with the library."""
    cfg = export_config(out)
    logits, state = run_graph(graph_session(out / "model.onnx"), torch.tensor([prompt]), zero_state(cfg, 1))
    decode, tokens = graph_session(out / "decode.onnx"), []
    for _ in range(n):
        tokens.append(int(logits[0, -1].argmax()))
        logits, state = run_graph(decode, torch.tensor([[tokens[-1]]]), state)
    return tokens


def test_decode_graph_has_one_decode_block_per_layer(exports):
    """--decode-blocks on: one DecodeBlock per layer and the final norm and LM head as one DecodeHead."""
    _, dirs = exports
    onnx_ops.register_schemas()
    n_layer = export_config(dirs["on"]).n_layer
    counts = {}
    for mode, out in dirs.items():
        onnx.checker.check_model(str(out / "decode.onnx"), full_check=True)
        graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
        ops = [n.op_type for n in graph.node if n.domain == DOMAIN]
        counts[mode] = {op: ops.count(op)
                        for op in ("DecodeBlock", "DecodeHead", "DecodeStep", "AddRMSNorm", "RMSNorm")}
        assert json.loads((out / "manifest.json").read_text())["decode_blocks"] is (mode == "on")
    assert counts["on"] == {"DecodeBlock": n_layer, "DecodeHead": 1, "DecodeStep": 0, "AddRMSNorm": 0, "RMSNorm": 0}
    assert counts["off"] == {"DecodeBlock": 0, "DecodeHead": 0, "DecodeStep": n_layer, "AddRMSNorm": n_layer,
                             "RMSNorm": 1}
    assert "DecodeBlock" in json.loads((dirs["on"] / "manifest.json").read_text())["ops"]["names"]


def test_weights_grow_by_the_untransposed_projections(exports, ckpt):
    """weights.bin holds every layer's in_proj and out_proj a second time and layer 0's zero residual row (float32,
    the residual stream's dtype; initializers under 1 KiB stay in decode.onnx), each 64-byte aligned; the other
    files' weights are shared, DecodeHead's [V, d] head too (this model's is tied: the embedding table)."""
    dtype, dirs = exports
    model = load_checkpoint(ckpt)
    zero_row = 4 * model.config.d_model
    extra = sum(layer.mixer.in_proj.weight.numel() + layer.mixer.out_proj.weight.numel()
                for layer in model.backbone.layers) * (2 if dtype == "float16" else 4) + (zero_row >= 1024) * zero_row
    grown = (dirs["on"] / "weights.bin").stat().st_size - (dirs["off"] / "weights.bin").stat().st_size
    assert extra <= grown < extra + 64 * (2 * model.config.n_layer + 1)


@pytest.mark.parametrize("how", ["library", "function"])
def test_prefill_then_64_steps_match_unfused_graph_and_reference(exports, ckpt, how):
    dtype, dirs = exports
    ref = load_checkpoint(ckpt, dtype=torch.float64)
    prompt = 5
    ids = torch.randint(0, ref.config.vocab_size, (2, prompt + 64), generator=torch.Generator().manual_seed(3))
    on = decode_logits(dirs["on"], ids, prompt, library=how == "library")
    off = decode_logits(dirs["off"], ids, prompt, library=how == "library")
    want = reference_decode_logits(ref, ids, prompt)
    tol = 1e-4 if dtype == "float32" else 1e-2  # the other export tests' bounds against float64
    assert rel_err(torch.from_numpy(on), want) <= tol
    # the fused graph is as close to the reference as the unfused one, and close to it
    assert rel_err(torch.from_numpy(on), want) <= 1.5 * rel_err(torch.from_numpy(off), want) + 1e-6
    assert rel_err(torch.from_numpy(on), torch.from_numpy(off)) <= tol


def test_greedy_tokens_equal_unfused_graph_and_reference(exports, ckpt):
    dtype, dirs = exports
    ref = load_checkpoint(ckpt, dtype=torch.float64)
    prompt = [5, 17, 42, 7, 3]
    want = ref.generate_greedy(torch.tensor([prompt]), 24)[0].tolist()
    assert greedy(dirs["on"], prompt, 24) == greedy(dirs["off"], prompt, 24) == want


def test_python_runtime_runs_the_export(exports):
    from mamba_runtime import MambaRuntime

    _, dirs = exports
    prompt = [5, 17, 42, 7, 3]
    rt = MambaRuntime(dirs["on"], provider="cpu", threads=2, custom_ops="require")
    assert rt.generate(prompt, 16).tokens[0] == greedy(dirs["off"], prompt, 16)


@pytest.mark.parametrize("exports", ["float16"], indirect=True)
def test_cpp_runtime_and_genai_run_the_export(exports):
    _, dirs = exports
    prompt = [5, 17, 42, 7, 3]
    want = greedy(dirs["off"], prompt, 12)
    proc = subprocess.run(["bash", "tools/build_cpp_runtime.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    binary = proc.stdout.strip().splitlines()[-1]
    res = subprocess.run([binary, str(dirs["on"]), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
                          "12", "--greedy"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    assert [int(t) for t in fields["tokens"].split(",")] == want
    og = pytest.importorskip("onnxruntime_genai")
    gen_model = og.Model(str(dirs["on"]))  # genai runs model.onnx; the library it registers has DecodeBlock too
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(gen_model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    assert list(gen.get_sequence(0))[len(prompt):] == want


# ---- the command line and its errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def biased_ckpt(tmp_path_factory):
    return save_transformers(make_hf_model("nondefault"), tmp_path_factory.mktemp("decode-block-bias") / "ckpt")


@pytest.mark.parametrize("case,flags,says", [
    ("tiny", ["--format", "torchscript"], "for ONNX exports only, not --format torchscript"),
    ("tiny", ["--decode-weights", "float16"], "not with --decode-weights float16"),
    ("biased", ["--dtype", "float16"], "in_proj/out_proj biases"),
])
def test_cli_refuses_decode_blocks_where_they_do_not_apply(ckpt, biased_ckpt, tmp_path, capsys, case, flags, says):
    source = ckpt if case == "tiny" else biased_ckpt
    line = cli_refusal(["export", str(source), "-o", str(tmp_path / "out"), "--no-library", "--decode-blocks", "on",
                        *flags], capsys)
    assert line.startswith("mamba-export export: error: --decode-blocks on: ") and says in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["auto", "off", "on"])
def test_only_on_turns_blocks_on(ckpt, mode):
    """auto (the default) is off for every export, whatever its dtype (the export test below checks float16): the
    fused CUDA kernel is faster only at batch 1; on turns it on wherever it applies."""
    cfg = load_checkpoint(ckpt).config
    assert resolve_decode_blocks(mode, cfg, "onnx", "float32") is (mode == "on")
    if mode == "on":
        with pytest.raises(ExportError, match="--decode-blocks on: for ONNX exports only"):
            resolve_decode_blocks(mode, cfg, "torchscript", "float32")
    else:
        assert resolve_decode_blocks(mode, cfg, "torchscript", "float32") is False


@pytest.mark.parametrize("how", ["default", "auto"])
def test_float16_export_has_no_blocks_by_default(ckpt, tmp_path, how):
    """--dtype float16 without --decode-blocks, and with --decode-blocks auto: decode.onnx has no DecodeBlock."""
    extra = [] if how == "default" else ["--decode-blocks", "auto"]
    out = tmp_path / "o"
    assert cli.main(["export", str(ckpt), "-o", str(out), "--dtype", "float16", "--no-library", *extra]) == 0
    assert json.loads((out / "manifest.json").read_text())["decode_blocks"] is False
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    assert all(n.op_type != "DecodeBlock" for n in graph.node)
    assert sum(n.op_type == "DecodeStep" for n in graph.node) == export_config(out).n_layer


def test_auto_is_off_where_blocks_do_not_apply(biased_ckpt, tmp_path):
    """--dtype float16 of a model with in_proj/out_proj bias: auto exports without DecodeBlock, no error."""
    out = export_checkpoint(biased_ckpt, tmp_path / "o", dtype="float16", with_library=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decode_blocks"] is False
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    assert all(n.op_type != "DecodeBlock" for n in graph.node)


def test_api_refuses_an_unknown_mode(ckpt, tmp_path):
    with pytest.raises(ExportError, match="unknown decode blocks mode 'yes'"):
        export_checkpoint(ckpt, tmp_path / "o", decode_blocks="yes")
    assert list(tmp_path.iterdir()) == []


def test_cli_help_explains_the_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--decode-blocks {auto,on,off}" in text
    assert "one DecodeBlock node" in text and "CUDA execution provider" in text and "weights.bin" in text
    assert "batch-1 decode latency" in text and "slower at batch 8 and above" in text
    assert "Default off (auto, the default value, means off for every export)" in text


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA part of the library does too)")
def test_cuda_chain_benchmark_compiles_against_the_kernel_header(tmp_path):
    """tools/decode_block_chain.cu (the DecodeBlock kernels' benchmark, run only on the GPU machine) fills every
    DecodeBlockArgs field by name: it must keep compiling against kernels/cuda/mamba_cuda.h."""
    out = tmp_path / "chain.o"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-Ikernels/cuda", "-c", "tools/decode_block_chain.cu",
                           "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA part of the library does too)")
def test_cuda_decode_block_timeline_build_compiles(tmp_path):
    """The per-phase timeline build of the DecodeBlock kernels (-DMAMBA_CUDA_TIMELINE, for decode_block_chain.cu) is
    compiled nowhere else: it must keep compiling, to PTX that reads the timer (~40 s)."""
    out = tmp_path / "decode_block.ptx"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-Ikernels/cuda", "-DMAMBA_CUDA_TIMELINE", "-ptx",
                           "kernels/cuda/decode_block.cu", "-o", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "%globaltimer" in out.read_text()


if __name__ == "__main__" and sys.argv[1:] == ["--bad-cases"]:
    for case in sorted(BAD_CASES):
        print(json.dumps({case: run_bad_case(case)}), flush=True)
