"""Exported models on onnxruntime's CUDA execution provider with the custom-op library: prefill and 64 decode steps
against the float64 reference model, greedy tokens against the CPU runtime, CUDA graphs on and off, and node
placement of the float16 graphs (no compute node on the CPU). Needs a GPU, onnxruntime-gpu and CuPy (skipped
otherwise); tools/gpu_check.sh runs them on the GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch  # before onnxruntime: loads the CUDA libraries onnxruntime-gpu needs

import onnxruntime as ort

ort.set_default_logger_severity(3)  # quiet the per-session CUDA EP device notices

from mamba_export.checkpoint import load_checkpoint
from support import make_hf_model, rel_err, save_transformers

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider")]

CUSTOM_OPS = {"SelectiveScan", "CausalConv1d", "DecodeStep", "RMSNorm", "AddRMSNorm", "DecodeBlock", "DecodeHead"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(config, dtype): (export dir, float64 reference model)} with the custom-op library in each export; dtype
    "float16-blocks" / "float32-blocks": exported with --decode-blocks on (one DecodeBlock node per layer; the
    "tiny" config, as DecodeBlock takes no in_proj/out_proj biases)."""
    from mamba_export.export import export_checkpoint

    out = {}
    for config, dtype in (("tiny", "float32"), ("nondefault", "float32"), ("nondefault", "float16"),
                          ("tiny", "float16-blocks"), ("tiny", "float32-blocks")):
        root = tmp_path_factory.mktemp(f"{config}-{dtype}")
        ckpt = save_transformers(make_hf_model(config, seed=3), root / "ckpt")
        blocks = "on" if dtype.endswith("-blocks") else "off"
        path = export_checkpoint(ckpt, root / "export", dtype=dtype.removesuffix("-blocks"), last_logits=True,
                                 decode_blocks=blocks)
        out[config, dtype] = (Path(path), load_checkpoint(ckpt, dtype=torch.float64))
    return out


def cuda_session(path: Path, profile: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(path.parent / json.loads((path.parent / "manifest.json").read_text())
                                       ["custom_op_library"]))
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    # use_tf32 0: onnxruntime's CUDA MatMuls default to TF32 (about 3e-4 relative error), not float32 arithmetic.
    return ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                          "CPUExecutionProvider"])


def zero_state(model, batch: int) -> list[np.ndarray]:
    c = model.config
    return [np.zeros(s, np.float32) for _ in range(c.n_layer)
            for s in ((batch, c.d_inner, c.d_conv - 1), (batch, c.d_inner, c.d_state))]


def run(sess: ort.InferenceSession, ids: torch.Tensor, state: list[np.ndarray]):
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, [ids.numpy(), *state])))
    return out[0], out[1:]


@pytest.mark.parametrize("key", [("tiny", "float32"), ("nondefault", "float32"), ("nondefault", "float16"),
                                 ("tiny", "float16-blocks"), ("tiny", "float32-blocks")],
                         ids=lambda k: "-".join(k))
def test_prefill_and_64_decode_steps_match_reference(exports, key):
    out, ref = exports[key]
    tol = 1e-4 if key[1].startswith("float32") else 1e-2
    ids = torch.randint(0, ref.config.vocab_size, (3, 7 + 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_state = ref(ids)
    logits, state = run(cuda_session(out / "model.onnx"), ids[:, :7], zero_state(ref, 3))
    assert rel_err(torch.from_numpy(logits.astype(np.float64)), want[:, :7]) <= tol
    decode = cuda_session(out / "decode.onnx")
    steps = []
    for t in range(7, ids.shape[1]):
        logits, state = run(decode, ids[:, t:t + 1], state)
        steps.append(logits)
    assert rel_err(torch.from_numpy(np.concatenate(steps, axis=1).astype(np.float64)), want[:, 7:]) <= tol
    for i in range(ref.config.n_layer):
        assert rel_err(torch.from_numpy(state[2 * i + 1]), want_state.ssm[i]) <= (1e-4 if tol == 1e-4 else 2e-2)


def prompts_for(model, batch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (3 + 2 * i,), generator=g).tolist() for i in range(batch)]


@pytest.mark.parametrize("key", [("nondefault", "float32"), ("tiny", "float32"), ("tiny", "float32-blocks")],
                         ids=lambda k: "-".join(k))
def test_greedy_tokens_identical_to_cpu_runtime(exports, key):
    from mamba_runtime import MambaRuntime
    from mamba_runtime.gpu import CudaGenerator

    out, ref = exports[key]
    prompts = prompts_for(ref, 4, seed=1)
    cpu = MambaRuntime(out, provider="cpu", custom_ops="require").generate(prompts, 40).tokens
    cuda_rt = MambaRuntime(out, provider="cuda", custom_ops="require")
    assert cuda_rt.device.name == "cuda"
    assert cuda_rt.generate(prompts, 40).tokens == cpu
    fast = CudaGenerator(out, batch=4, custom_ops="require").generate(prompts, 40)
    assert fast.tolist() == cpu


@pytest.mark.parametrize("key", [("nondefault", "float32"), ("tiny", "float32")], ids=lambda k: "-".join(k))
def test_follow_on_cuda_continues_as_one_prompt_of_the_whole_history(exports, key):
    """Generation.follow() on the CUDA provider (its state goes back to the device through the prefill's start
    state): the tokens of the whole history prefilled as one prompt, as on the CPU, and the CPU provider's tokens."""
    from mamba_runtime import MambaRuntime

    out, ref = exports[key]
    first, turn = prompts_for(ref, 2, seed=3)
    runs = {}
    for p in ("cpu", "cuda"):
        rt = MambaRuntime(out, provider=p, custom_ops="require")
        gen = rt.start(first, 12)
        gen.run()
        runs[p] = gen.follow(turn, 12).run().tokens
        assert runs[p] == rt.generate([first + gen.tokens[0] + turn], 12).tokens, p
    assert runs["cuda"] == runs["cpu"]


@pytest.mark.parametrize("key", [("nondefault", "float32"), ("tiny", "float32"), ("tiny", "float32-blocks")],
                         ids=lambda k: "-".join(k))
def test_runtime_steps_feed_each_steps_ids(exports, key):
    """MambaRuntime's decode steps on CUDA against the CPU runtime's, logits and states after every step, fed a fixed
    random token sequence (not sampled, so every step's ids differ): catches a step run on other ids than the ones
    given, which greedy tokens of a random model can miss when its argmax barely depends on the input."""
    from mamba_runtime import MambaRuntime

    out, ref = exports[key]
    prompts = prompts_for(ref, 3, seed=2)
    feed = torch.randint(0, ref.config.vocab_size, (12, 3), generator=torch.Generator().manual_seed(5)).numpy()
    runs = [MambaRuntime(out, provider=p, custom_ops="require").start(prompts, 20) for p in ("cpu", "cuda")]
    for g in runs:
        g.prefill()
    for ids in feed:
        cpu, cuda = (np.array(g.state.step(ids), dtype=np.float64) for g in runs)
        assert rel_err(torch.from_numpy(cuda), torch.from_numpy(cpu)) <= 1e-4
    for a, b in zip(runs[0].state.download(), runs[1].state.download()):
        assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) <= 1e-4


@pytest.mark.parametrize("key", [("nondefault", "float32"), ("nondefault", "float16"), ("tiny", "float16-blocks")],
                         ids=lambda k: "-".join(k))
def test_one_cuda_runtime_serves_threads(exports, key):
    """One MambaRuntime on the CUDA provider shared by 4 threads (a server's request handlers; its two sessions are
    shared, each generation has its own device buffers and bindings), generate and stream mixed, sampled: every
    request gets exactly the tokens of the same calls made one after another."""
    import threading

    from mamba_runtime import MambaRuntime, SamplingConfig

    out, ref = exports[key]
    rt = MambaRuntime(out, provider="cuda", custom_ops="require")
    sampled = SamplingConfig(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=11)
    prompts = [p * (1 + i % 3) for i, p in enumerate(prompts_for(ref, 16, seed=4))]
    want = [rt.generate(p, 24, sampled).tokens[0] for p in prompts]
    got: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(prompts), 4):
                got[i] = (rt.generate(prompts[i], 24, sampled).tokens[0] if i % 2
                          else list(rt.stream(prompts[i], 24, sampled)))
        except BaseException as e:  # re-raised below: an exception in a thread would otherwise only be printed
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert [got[i] for i in range(len(prompts))] == want


@pytest.mark.parametrize("prompts", ["ragged", "equal", "single"])
@pytest.mark.parametrize("path", ["auto", "split", "unfolded"])
def test_decode_blocks_runtime_tokens_match_cpu(exports, path, prompts, monkeypatch):
    """MambaRuntime on CUDA with DecodeBlock nodes against the CPU runtime, for each kernel path
    (MAMBA_EXPORT_CUDA_DECODE_BLOCK) and for prompts of different lengths, of one length, and a single prompt (this
    matrix localised the stale-ids bug of the runtime's CUDA binding: docs/gpu.md)."""
    from mamba_runtime import MambaRuntime

    out, ref = exports["tiny", "float32-blocks"]
    batch = prompts_for(ref, 4, seed=1)
    chosen = {"ragged": batch, "equal": [p[:3] for p in batch], "single": batch[:1]}[prompts]
    cpu = MambaRuntime(out, provider="cpu", custom_ops="require").generate(chosen, 24).tokens
    if path != "auto":
        monkeypatch.setenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", path)
    assert MambaRuntime(out, provider="cuda", custom_ops="require").generate(chosen, 24).tokens == cpu


@pytest.mark.parametrize("key", [("nondefault", "float32"), ("nondefault", "float16"), ("tiny", "float16-blocks")],
                         ids=lambda k: "-".join(k))
def test_cuda_graphs_on_and_off_give_identical_tokens(exports, key):
    from mamba_runtime.gpu import CudaGenerator

    out, ref = exports[key]
    prompts = prompts_for(ref, 5, seed=2)
    plain = CudaGenerator(out, batch=5, cuda_graph=False, custom_ops="require")
    graph = CudaGenerator(out, batch=5, cuda_graph=True, custom_ops="require")
    for temperature in (0.0, 0.8):
        a = plain.generate(prompts, 48, temperature=temperature, seed=7)
        b = graph.generate(prompts, 48, temperature=temperature, seed=7)
        np.testing.assert_array_equal(a, b)
    conv_a, ssm_a = plain.state()
    conv_b, ssm_b = graph.state()
    np.testing.assert_array_equal(ssm_a, ssm_b)
    np.testing.assert_array_equal(conv_a, conv_b)


@pytest.mark.parametrize("graph", [False, True], ids=["plain", "graph"])
def test_queued_steps_give_the_tokens_and_state_of_single_steps(exports, graph):
    """CudaGenerator.steps (each step queued before the previous step's tokens are read) against a loop of step():
    identical tokens and states, greedy and sampled; leaving the loop early leaves the queued steps run (the state of
    read + lookahead steps); bad arguments are one-line errors."""
    from mamba_runtime.errors import GenerationInputError
    from mamba_runtime.gpu import CudaGenerator

    out, ref = exports["tiny", "float16-blocks"]
    prompts = prompts_for(ref, 3, seed=4)
    one = CudaGenerator(out, batch=3, cuda_graph=graph, custom_ops="require")
    queued = CudaGenerator(out, batch=3, cuda_graph=graph, custom_ops="require")
    for temperature, lookahead in ((0.0, 1), (0.8, 3)):
        a = [one.prefill(prompts, temperature, seed=9)] + [one.step() for _ in range(30)]
        b = [queued.prefill(prompts, temperature, seed=9)] + list(queued.steps(30, lookahead=lookahead))
        np.testing.assert_array_equal(np.stack(a), np.stack(b))
        for x, y in zip(one.state(), queued.state()):
            np.testing.assert_array_equal(x, y)
    # Early exit: 5 tokens read with lookahead 2 -> 7 steps run.
    one.prefill(prompts)
    queued.prefill(prompts)
    a = [one.step() for _ in range(7)]
    it = queued.steps(20, lookahead=2)
    b = [next(it) for _ in range(5)]
    it.close()
    np.testing.assert_array_equal(np.stack(a[:5]), np.stack(b))
    for x, y in zip(one.state(), queued.state()):
        np.testing.assert_array_equal(x, y)
    assert list(queued.steps(0)) == []
    for bad in ({"n": -1}, {"n": 2.0}, {"n": 3, "lookahead": -1}, {"n": True}):
        with pytest.raises(GenerationInputError, match="must be a non-negative integer"):
            queued.steps(**bad)


def cpu_compute_nodes(profile_file: str) -> tuple[list[str], set[str]]:
    """From an onnxruntime profile: nodes on the CPU with a floating-point output, and the custom ops run on CUDA."""
    events = json.loads(Path(profile_file).read_text())
    on_cpu, custom_on_cuda = [], set()
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or "provider" not in args:
            continue
        if args["provider"] == "CUDAExecutionProvider" and args.get("op_name") in CUSTOM_OPS:
            custom_on_cuda.add(args["op_name"])
        if args["provider"] == "CPUExecutionProvider":
            out_types = {t for o in args.get("output_type_shape", []) for t in o}
            if out_types - {"int64", "int32", "bool"}:
                on_cpu.append(f"{args.get('op_name')} {ev.get('name')} -> {sorted(out_types)}")
    return on_cpu, custom_on_cuda


@pytest.mark.parametrize("key", [("nondefault", "float16"), ("tiny", "float16-blocks")], ids=lambda k: "-".join(k))
def test_float16_graphs_run_no_compute_node_on_cpu(exports, tmp_path, key):
    out, ref = exports[key]
    dtype = key[1]
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    norms = {"RMSNorm", "AddRMSNorm"}
    # A blocks export's decode.onnx: every layer one DecodeBlock, then DecodeHead (the final norm and the LM head).
    decode_ops = {"DecodeBlock", "DecodeHead"} if dtype.endswith("-blocks") else {"DecodeStep"} | norms
    for graph, n, want_ops in (("model.onnx", 9, {"SelectiveScan", "CausalConv1d"} | norms),
                               ("decode.onnx", 1, decode_ops)):
        sess = cuda_session(out / graph, profile=str(tmp_path / graph))
        run(sess, ids[:, :n], zero_state(ref, 2))
        on_cpu, custom = cpu_compute_nodes(sess.end_profiling())
        assert on_cpu == [], f"{graph}: nodes with floating-point outputs on the CPU: {on_cpu}"
        assert custom == want_ops, f"{graph}: custom ops on CUDA: {custom}"


@pytest.mark.parametrize("key", [("nondefault", "float16"), ("tiny", "float16-blocks")], ids=lambda k: "-".join(k))
def test_runtime_reports_no_cpu_placed_compute_node_for_our_exports(exports, key):
    """MambaRuntime and CudaGenerator check onnxruntime's node assignment when they open a graph under CUDA: our
    exports place no compute node on the CPU, so no CpuPlacementWarning (None: this onnxruntime cannot say)."""
    import warnings

    from mamba_runtime import CpuPlacementWarning, MambaRuntime
    from mamba_runtime.gpu import CudaGenerator

    out, _ = exports[key]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CpuPlacementWarning)
        rt = MambaRuntime(out, provider="cuda", custom_ops="require")
        CudaGenerator(out, batch=2, custom_ops="require")
    assert all(nodes in ([], None) for nodes in rt.cpu_nodes.values()), rt.cpu_nodes


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 50280), (64, 50280), (3, 7), (5, 4097)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_argmax_matches_numpy(shape, dtype):
    """CudaGenerator's argmax kernels: the first maximum of each row, as numpy picks it (ties, -inf, NaN), into the
    device ids and, when given, into pinned host memory."""
    cp = pytest.importorskip("cupy")
    from mamba_runtime.gpu import _Argmax

    b, V = shape
    rng = np.random.default_rng(V + b)
    x = rng.standard_normal(shape).astype(dtype)
    x[0, :] = -np.inf
    x[0, V // 2] = x[0, V - 1] = 3.0  # a tie: the first index wins
    if b > 2:
        x[1, :] = np.round(x[1, :])  # many ties
        x[2, V // 3] = np.nan  # NaN counts as the maximum in numpy
    ids = cp.full((b, 1), -1, dtype=cp.int64)
    argmax = _Argmax(cp, b, V)
    argmax(cp.asarray(x), ids)
    np.testing.assert_array_equal(cp.asnumpy(ids)[:, 0], np.argmax(x, axis=-1))
    host = np.frombuffer(cp.cuda.alloc_pinned_memory(8 * b), dtype=np.int64, count=b)
    host[:] = -1
    ids[:] = -1
    argmax(cp.asarray(x), ids, host.ctypes.data)
    cp.cuda.Device().synchronize()
    np.testing.assert_array_equal(host, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(cp.asnumpy(ids)[:, 0], host)
