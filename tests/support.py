"""Shared helpers for the tests: checkpoints built from configs with transformers (an implementation we did not
write), perturbed away from their initial values, saved in either layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Configs used across the suite. "nondefault" exercises every option: d_state 8, conv 3, dt_rank not D/16,
# biases on, untied head, vocab not a multiple of 8.
HF_CONFIGS = {
    "tiny": dict(vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=2, conv_kernel=4,
                 tie_word_embeddings=True),
    "nondefault": dict(vocab_size=101, hidden_size=48, state_size=8, num_hidden_layers=3, conv_kernel=3,
                       time_step_rank=5, use_bias=True, use_conv_bias=True, tie_word_embeddings=False, expand=2),
    "noconvbias": dict(vocab_size=72, hidden_size=40, state_size=4, num_hidden_layers=2, conv_kernel=2,
                       time_step_rank=7, use_bias=False, use_conv_bias=False, tie_word_embeddings=True, expand=3),
}


def make_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """transformers MambaForCausalLM from HF_CONFIGS[name] (``overrides`` replace some of its fields), every parameter
    perturbed with a fixed seed."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    cfg = MambaConfig(**{**HF_CONFIGS[name], **overrides}, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            p.add_(0.2 * torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))
    return model.to(dtype)


def hf_to_state_spaces_dict(hf_model) -> dict[str, torch.Tensor]:
    """transformers' state dict renamed to state-spaces/mamba keys (embeddings -> embedding)."""
    sd = {}
    for k, v in hf_model.state_dict().items():
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.detach().clone().contiguous()
    return sd


def state_spaces_config(hf_model, pad_vocab_size_multiple: int = 1, vocab_size: int | None = None) -> dict:
    """state-spaces/mamba config.json written by hand from a transformers config (independent of our code)."""
    c = hf_model.config
    return {
        "d_model": c.hidden_size,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab_size or c.vocab_size,
        "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "dt_rank": c.time_step_rank, "bias": c.use_bias, "conv_bias": c.use_conv_bias},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_vocab_size_multiple,
        "tie_embeddings": c.tie_word_embeddings,
    }


def save_state_spaces(hf_model, out: Path, fmt: str = "bin", **cfg_kw) -> Path:
    """Write hf_model in the state-spaces/mamba layout: config.json plus pytorch_model.bin or model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(state_spaces_config(hf_model, **cfg_kw)))
    sd = hf_to_state_spaces_dict(hf_model)
    if fmt == "bin":
        torch.save(sd, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        if hf_model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(out / "model.safetensors"))
    return out


def padded_vocab_model(seed: int = 3):
    """transformers' "nondefault" model (101 tokens) with 104 embedding rows: what state-spaces/mamba stores for
    vocab_size 101 and pad_vocab_size_multiple 8 (save it with save_state_spaces(..., vocab_size=101,
    pad_vocab_size_multiple=8))."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(**{**make_hf_model("nondefault").config.to_dict(), "vocab_size": 104})
    torch.manual_seed(seed)
    return MambaForCausalLM(cfg).eval()


def save_transformers(hf_model, out: Path, sharded: bool = False, fmt: str = "safetensors") -> Path:
    """Write hf_model with transformers' own save_pretrained (or a pytorch_model.bin beside its config)."""
    if fmt == "bin":
        out.mkdir(parents=True, exist_ok=True)
        hf_model.config.save_pretrained(out)
        sd = hf_model.state_dict()
        if hf_model.config.tie_word_embeddings:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        torch.save(sd, out / "pytorch_model.bin")
        return out
    hf_model.save_pretrained(out, max_shard_size="20KB" if sharded else "10GB")
    return out


def library_built() -> bool:
    """Whether the custom-op library has been built (tools/build_custom_ops.sh; setup does it). A
    MAMBA_EXPORT_OPS_LIBRARY that names no file raises: a mistyped path must not quietly skip the library's tests."""
    return library_path_or_none() is not None


def library_path_or_none() -> str | None:
    """The custom-op library the runtime would load, or None when none is built (see :func:`library_built`)."""
    import os

    from mamba_export.errors import MambaExportError
    from mamba_runtime import custom_op_library_path

    if os.environ.get("MAMBA_EXPORT_OPS_LIBRARY"):
        return custom_op_library_path()
    try:
        return custom_op_library_path()
    except MambaExportError:
        return None


def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids, use_cache=False).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# ---- exported graphs and the custom-op library ---------------------------------------------------------------------
def zero_state(cfg, batch: int) -> list:
    """The flat zero state of an exported graph for a model config: per layer conv (b, E, K-1), ssm (b, E, N)."""
    import numpy as np

    state = []
    for _ in range(cfg.n_layer):
        state += [np.zeros((batch, cfg.d_inner, cfg.d_conv - 1), np.float32),
                  np.zeros((batch, cfg.d_inner, cfg.d_state), np.float32)]
    return state


def cli_refusal(argv: list[str], capsys) -> str:
    """Runs ``mamba-export ARGV``, which must refuse with exit status 2 and one line on stderr; returns that line."""
    from mamba_export import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def custom_node_model(op: str, dtype, rdtype, overrides: dict | None = None, functions: bool = False, **attrs):
    """One ``op`` node of the custom-op domain whose inputs and outputs, named and typed as in its
    ``onnx_ops._SIGNATURES`` entry (T ``dtype``, R ``rdtype``, F float32, H float16; numpy dtypes), are graph I/O of
    unknown shape, so only the op checks shapes. ``overrides`` declares other numpy dtypes for some inputs;
    ``functions`` attaches the model-local functions (what a stock onnxruntime runs)."""
    import numpy as np
    from onnx import helper

    from mamba_export.export import onnx_ops

    ins, outs, _ = onnx_ops._SIGNATURES[op]
    kinds, overrides = {"T": dtype, "R": rdtype, "F": np.float32, "H": np.float16}, overrides or {}

    def value(name: str, kind: str, may_override: bool):
        dt = overrides.get(name, kinds[kind]) if may_override else kinds[kind]
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dt)), None)

    graph = helper.make_graph(
        [helper.make_node(op, [n for n, _ in ins], [n for n, _ in outs], domain=onnx_ops.DOMAIN, **attrs)], op,
        [value(n, k, True) for n, k in ins], [value(n, k, False) for n, k in outs])
    opsets = [helper.make_opsetid("", onnx_ops.OPSET), helper.make_opsetid(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    if functions:
        model.functions.extend(onnx_ops.model_functions())
    return model


def scaled_error(got, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|), in float64: ``got`` a numpy array, ``want`` a float64 reference."""
    import numpy as np

    want = want.numpy()
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max()))


def op_session(model, library: bool = True, threads: int = 2):
    """A CPU onnxruntime session of an in-memory model, with the custom-op library registered (``library=False``: a
    stock onnxruntime, so the model-local functions run)."""
    import onnxruntime as ort
    from mamba_runtime import custom_op_library_path

    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(custom_op_library_path())
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def float64_mixer(cfg, t: dict):
    """A float64 ``MambaMixer`` of config ``cfg`` whose parameters are the float64 tensors ``t``, named as the custom
    ops' inputs (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D; in_proj_weight and
    out_proj_weight when present, else those projections are identities)."""
    from mamba_export.model import MambaMixer

    mixer = MambaMixer(cfg).double()
    with torch.no_grad():
        for name in ("in_proj", "out_proj"):
            if f"{name}_weight" in t:
                getattr(mixer, name).weight.copy_(t[f"{name}_weight"])
            else:
                setattr(mixer, name, torch.nn.Identity())
        mixer.conv1d.weight.copy_(t["conv_weight"].unsqueeze(1))
        mixer.conv1d.bias.copy_(t["conv_bias"])
        mixer.x_proj.weight.copy_(t["x_proj_weight"])
        mixer.dt_proj.weight.copy_(t["dt_proj_weight"])
        mixer.dt_proj.bias.copy_(t["dt_bias"])
        mixer.A_log.copy_(torch.log(-t["A"]))
        mixer.D.copy_(t["D"])
    return mixer


def run_graph(sess, ids: torch.Tensor, state: list) -> tuple:
    """One call of an exported graph: ids (b, l) and the flat state -> logits, the new flat state."""
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, dict(zip(names, [ids.numpy(), *state])))
    return out[0], out[1:]


def bad_case_outcomes_of(test_file: str) -> dict:
    """Runs ``python test_file --bad-cases`` (each invalid-input case in one subprocess, so that a crash fails the
    tests instead of killing pytest), which prints one JSON line {case: {"raised", "message"}} per finished case."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, test_file, "--bad-cases"], capture_output=True, text=True, timeout=120)
    outcomes = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            outcomes.update(json.loads(line))
    return {"returncode": proc.returncode, "stderr": proc.stderr[-2000:], "cases": outcomes}


def check_bad_case(outcomes: dict, name: str, message_parts) -> None:
    """The case finished in the subprocess, raised an onnxruntime error, and its message holds every part."""
    got = outcomes["cases"].get(name)
    assert got is not None, (f"the subprocess ended (exit code {outcomes['returncode']}) before case {name} "
                             f"finished:\n{outcomes['stderr']}")
    assert got["raised"], f"{name}: no error"
    for part in message_parts:
        assert part in got["message"], f"{name}: {part!r} not in {got['message']!r}"


def outcome_of(run) -> dict:
    """What the subprocess prints for one invalid-input case: whether ``run()`` raised, and the message."""
    try:
        run()
    except Exception as error:  # onnxruntime raises its own exception classes
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None, "message": ""}


def bad_case_tests(test_file: str, cases: dict, message_parts):
    """A test module's invalid-input tests: a module fixture running ``python test_file --bad-cases`` once, one test
    per case (``message_parts(cases[name])``: the parts its error message must hold) and one for a clean exit.
    Assign the returned (fixture, test, test) to module names so that pytest collects them."""
    import pytest

    @pytest.fixture(scope="module")
    def bad_case_outcomes() -> dict:
        return bad_case_outcomes_of(test_file)

    @pytest.mark.parametrize("name", sorted(cases))
    def test_invalid_input_is_an_onnxruntime_error(name, bad_case_outcomes):
        check_bad_case(bad_case_outcomes, name, message_parts(cases[name]))

    def test_bad_case_subprocess_exits_cleanly(bad_case_outcomes):
        assert bad_case_outcomes["returncode"] == 0, bad_case_outcomes["stderr"]

    return bad_case_outcomes, test_invalid_input_is_an_onnxruntime_error, test_bad_case_subprocess_exits_cleanly


# ---- export directories ------------------------------------------------------------------------------------------


def export_config(out: Path):
    """The model config recorded in an export's manifest.json."""
    from mamba_export.config import MambaConfig

    return MambaConfig.from_dict(json.loads((out / "manifest.json").read_text())["config"])


def graph_session(path: Path, library: bool = True):
    """A 2-thread CPU onnxruntime session of an exported graph, with the custom-op library (``library=False``: a stock
    onnxruntime, the ops' functions)."""
    import onnxruntime as ort
    from mamba_runtime import custom_op_library_path

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if library:
        so.register_custom_ops_library(custom_op_library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decode_logits(out: Path, ids: torch.Tensor, prompt: int, library: bool = True):
    """Prefill ids[:, :prompt] through model.onnx, then one decode.onnx step per later token: the steps' logits
    (b, l - prompt, V), numpy."""
    import numpy as np

    cfg = export_config(out)
    _, state = run_graph(graph_session(out / "model.onnx", library), ids[:, :prompt], zero_state(cfg, ids.shape[0]))
    decode, steps = graph_session(out / "decode.onnx", library), []
    for t in range(prompt, ids.shape[1]):
        logits, state = run_graph(decode, ids[:, t:t + 1], state)
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def reference_decode_logits(ref, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """What :func:`decode_logits` computes, by a reference MambaLM: prefill, then ``step`` per later token."""
    with torch.no_grad():
        _, state = ref(ids[:, :prompt])
        want = []
        for t in range(prompt, ids.shape[1]):
            logits, state = ref.step(ids[:, t], state)
            want.append(logits[:, None])
    return torch.cat(want, dim=1)


# Values a manifest field should never hold, for mutated_manifests.
_ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -2**63, 1.5, -0.0, 1e308, float("nan"), "", "x",
               "../../etc/passwd", "a" * 5000, [], [1], {}, {"a": 1}]


def mutated_manifests(text: str, count: int, seed: int) -> list[bytes]:
    """``count`` damaged copies of a JSON document: a leaf or a key replaced, removed or added (about two in three;
    the value from _ODD_VALUES), or bytes flipped, cut out, repeated or the text truncated. Seeded: the same list every
    run."""
    import random

    rng = random.Random(seed)
    doc = json.loads(text)

    def paths(node, prefix=()):
        yield prefix
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            yield from paths(v, prefix + (k,))

    all_paths = [p for p in paths(doc) if p]
    # Most leaves of an export's manifest describe its graphs' inputs and outputs (which the runtimes check against
    # the graphs themselves); four mutations in five go to the other fields.
    read = [p for p in all_paths if p[0] != "graphs"] or all_paths
    out = []
    for _ in range(count):
        if rng.random() < 0.65:
            d = json.loads(text)
            path = rng.choice(read if rng.random() < 0.8 else all_paths)
            parent = d
            for k in path[:-1]:
                parent = parent[k]
            kind = rng.random()
            if kind < 0.6:
                parent[path[-1]] = rng.choice(_ODD_VALUES)
            elif kind < 0.8 and isinstance(parent, dict):
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[rng.choice(["zzz", "", "config", "files", path[-1] + "_"])] = rng.choice(_ODD_VALUES)
            else:
                parent.append(rng.choice(_ODD_VALUES))
            out.append(json.dumps(d).encode())  # NaN as NaN: not JSON, which the reader must refuse
        else:
            b = bytearray(text.encode())
            i = rng.randrange(len(b))
            kind = rng.random()
            if kind < 0.4:
                b[i] = rng.choice(b'{}[]",:0123456789-.eE \\\x00\xff')
            elif kind < 0.6:
                del b[i:i + rng.randrange(1, 40)]
            elif kind < 0.8:
                b[i:i] = b[i:i + rng.randrange(1, 40)]
            else:
                del b[i:]
            out.append(bytes(b))
    return out


def refusals(damaged: list[bytes], attempt, refusal: type[Exception]) -> list[Exception]:
    """``attempt(data)`` for each damaged document: the ``refusal`` exceptions raised, in order. Any other exception
    fails the calling test, naming the case."""
    refused = []
    for i, data in enumerate(damaged):
        try:
            attempt(data)
        except refusal as e:
            refused.append(e)
        except Exception as e:  # the test's failure, with the case
            raise AssertionError(f"mutation {i}: {data[:300]!r}: {type(e).__name__}: {e}") from e
    return refused
