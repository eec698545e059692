"""The Python runtime (mamba_runtime) on a real export, against the reference model (MambaLM)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from mamba_export.errors import MambaExportError
from mamba_export.export import export_checkpoint
from mamba_runtime import (CustomOpsFallbackWarning, ExportDirError, GenerationInputError, MambaRuntime,
                           ModelOutputError, SamplingConfig, SnapshotError)
from mamba_runtime.sessions import open_session, resolve_library, session_options
from support import library_built, make_hf_model, save_state_spaces

PROMPTS = [[5, 17, 200, 3, 9], [42], list(range(60, 80)), [9, 8, 7, 6, 5]]  # rows 0 and 3 prefill together
SAMPLED = SamplingConfig(temperature=1.3, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=11)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """A tiny byte-level model (transformers' MambaForCausalLM weights), exported with model_last.onnx."""
    root = tmp_path_factory.mktemp("runtime")
    ckpt = save_state_spaces(make_hf_model("tiny"), root / "ckpt")
    (ckpt / "byte_vocab.json").write_text(json.dumps({"type": "bytes", "vocab_size": 256}))
    out = export_checkpoint(ckpt, root / "export", last_logits=True, with_library=library_built())
    return SimpleNamespace(dir=out, model=load_checkpoint(ckpt), root=root)


@pytest.fixture(scope="module")
def rt(exp):
    return MambaRuntime(exp.dir, provider="cpu", threads=1)


def test_prefill_and_decode_logits_match_the_reference_at_every_position(exp, rt):
    ids = np.random.default_rng(0).integers(0, 256, 16).tolist()
    with torch.no_grad():
        ref = exp.model(torch.tensor([ids]))[0][0].numpy()
    logits, conv, ssm = rt.prefill([ids[:5]])
    np.testing.assert_allclose(logits[0], ref[4], atol=1e-4 * np.abs(ref).max())
    state = rt.new_state(1)
    state.upload(conv, ssm)
    for t in range(5, 16):
        np.testing.assert_allclose(state.step(np.array([ids[t]]))[0], ref[t], atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("graph", ["model_last.onnx", "model.onnx"])
def test_a_prompt_prefilled_in_chunks_equals_one_run(exp, rt, graph):
    """Chunks of 7 tokens (the state carried between runs) through either prefill graph."""
    chunked = MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False, prefill_chunk=7)
    if graph == "model.onnx":  # the graph of exports without --last-logits: logits of every position
        options = session_options(1, rt.custom_op_library)
        chunked.prefill_session = open_session(exp.dir / graph, options, ["CPUExecutionProvider"])
    batch = [list(range(3, 40)), *PROMPTS]
    whole = rt.prefill(batch)
    for a, b in zip(chunked.prefill(batch), whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    assert chunked.generate(batch, 10).tokens == rt.generate(batch, 10).tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_the_reference_model(exp, rt, prompt):
    want = exp.model.generate_greedy(torch.tensor([prompt]), 24)[0].tolist()
    result = rt.generate(prompt, 24)
    assert result.tokens == [want] and result.finish_reasons == ["length"]


def test_sampled_tokens_are_reproducible_with_a_seed(rt):
    a = rt.generate(PROMPTS[0], 40, SAMPLED).tokens
    assert rt.generate(PROMPTS[0], 40, SAMPLED).tokens == a
    other = rt.generate(PROMPTS[0], 40, dataclasses.replace(SAMPLED, seed=12)).tokens
    assert other != a
    assert len(set(a[0])) > 5  # really sampled, not stuck on one token


def test_the_result_reports_the_seed_drawn_and_it_reproduces_the_run(rt):
    unseeded = SamplingConfig(temperature=1.3, top_k=40)
    r = rt.generate(PROMPTS[:2], 20, unseeded)
    assert isinstance(r.seed, int)
    assert rt.generate(PROMPTS[:2], 20, dataclasses.replace(unseeded, seed=r.seed)).tokens == r.tokens
    assert rt.generate(PROMPTS[0], 3, SAMPLED).seed == 11
    assert rt.generate(PROMPTS[0], 3).seed is None  # greedy draws nothing
    gen = rt.start(PROMPTS[0], 6, unseeded)
    gen.step()
    assert rt.restore(gen.snapshot()).run().seed == gen.result().seed


def test_an_uneven_batch_equals_each_prompt_alone(rt):
    alone = [rt.generate(p, 20).tokens[0] for p in PROMPTS]
    assert rt.generate(PROMPTS, 20).tokens == alone
    together = rt.prefill(PROMPTS)
    for i, p in enumerate(PROMPTS):
        for a, b in zip(together, rt.prefill([p]), strict=True):
            np.testing.assert_allclose(a[:, i] if a.ndim == 4 else a[i], b[:, 0] if b.ndim == 4 else b[0],
                                       rtol=1e-6, atol=1e-6 * np.abs(b).max())
    # sampling: each row draws from its own generator, so row 0 does not depend on the other rows
    row0 = rt.generate(PROMPTS[0], 20, SAMPLED).tokens[0]
    assert rt.generate(PROMPTS, 20, SAMPLED).tokens[0] == row0
    assert rt.generate([PROMPTS[0], [7, 7, 7]], 20, SAMPLED).tokens[0] == row0


def test_a_row_that_stops_early_does_not_change_the_others(rt):
    full = rt.generate(PROMPTS, 15, SAMPLED).tokens
    stop = full[1][0]
    result = rt.generate(PROMPTS, 15, SAMPLED, stop_tokens=[stop])
    assert result.tokens[1] == [stop] and result.finish_reasons[1] == "stop"
    for row in (0, 2, 3):
        want = full[row][: full[row].index(stop) + 1] if stop in full[row] else full[row]
        assert result.tokens[row] == want


def test_stop_tokens_end_a_sequence_and_are_not_in_the_text(rt):
    first = rt.generate(PROMPTS[0], 10).tokens[0][0]
    result = rt.generate(PROMPTS[0], 10, stop_tokens=[first])
    assert result.tokens == [[first]] and result.finish_reasons == ["stop"] and result.texts == [""]


def test_streaming_yields_the_same_tokens_and_can_stop_early(rt):
    full = rt.generate(PROMPTS[2], 30, SAMPLED).tokens[0]
    assert list(rt.stream(PROMPTS[2], 30, SAMPLED)) == full
    assert list(itertools.islice(rt.stream(PROMPTS[2], 30, SAMPLED), 4)) == full[:4]


def test_a_callback_can_stop_the_generation(rt):
    seen = []
    result = rt.generate(PROMPTS, 30, callback=lambda new: seen.append(new) or len(seen) == 3)
    assert [len(t) for t in result.tokens] == [3] * 4 and result.finish_reasons == ["cancelled"] * 4


def test_text_in_and_text_out_with_the_byte_vocabulary(rt):
    result = rt.generate("héllo", 12, SAMPLED)
    assert result.prompts == [list("héllo".encode())]
    assert result.texts == [bytes(result.tokens[0]).decode("utf-8", errors="replace")]
    assert "".join(rt.stream_text("héllo", 12, SAMPLED)) == result.texts[0]
    batch = rt.generate(["héllo", "a longer prompt"], 12, SAMPLED)
    assert batch.prompts == [list("héllo".encode()), list(b"a longer prompt")]
    assert batch.texts[0] == result.texts[0]


@pytest.mark.parametrize("when", [0, 7])
def test_snapshot_restored_in_another_process_continues_identically(exp, rt, tmp_path, when):
    want = rt.generate(PROMPTS, 25, SAMPLED).tokens
    gen = rt.start(PROMPTS, 25, SAMPLED)
    for _ in range(when):
        gen.step()
    gen.save(tmp_path / "snap.npz")
    code = ("import json, sys; from mamba_runtime import MambaRuntime; "
            "rt = MambaRuntime(sys.argv[1], provider='cpu', threads=1); "
            "print(json.dumps(rt.restore(sys.argv[2]).run().tokens))")
    out = subprocess.run([sys.executable, "-c", code, str(exp.dir), str(tmp_path / "snap.npz")],
                         capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.splitlines()[-1]) == want
    restored = rt.restore(gen.snapshot()).run()  # and in this process, from bytes
    assert restored.tokens == want
    # the prefill ran in another process: no time is made up for it, and every step here is a decode step
    assert restored.timings["prefill_ms"] is None and restored.timings["ttft_ms"] is None
    assert restored.timings["decode_steps"] == 25 - when
    fresh = gen.result().timings if when else rt.generate(PROMPTS, 3, SAMPLED).timings
    assert fresh["prefill_ms"] > 0 and fresh["ttft_ms"] >= fresh["prefill_ms"]


def test_a_snapshot_that_cannot_be_written_is_a_snapshot_error_and_leaves_nothing(rt, tmp_path):
    gen = rt.start([1, 2], 3)
    (tmp_path / "file").write_text("x")
    for path, reason in [(tmp_path / "no" / "snap.npz", "No such file or directory"), (tmp_path, "Is a directory"),
                         (tmp_path / "file" / "snap.npz", "Not a directory")]:
        with pytest.raises(SnapshotError, match=re.escape(f"{path}: cannot write the snapshot ({reason})")):
            gen.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*.tmp"))
    gen.save(tmp_path / "snap.npz")
    gen.save(tmp_path / "snap.npz")  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "snap.npz"]
    assert rt.restore(tmp_path / "snap.npz").run().tokens == gen.run().tokens


def test_bad_snapshots_are_clear_errors(rt, tmp_path):
    with pytest.raises(SnapshotError, match="not a snapshot"):
        rt.restore(b"garbage")
    with pytest.raises(SnapshotError, match="not a readable snapshot"):
        rt.restore(b"PK\x03\x04garbage")
    with pytest.raises(SnapshotError, match="snapshot bytes or a file path, not int"):
        rt.restore(5)
    with pytest.raises(SnapshotError, match="does not exist"):
        rt.restore(tmp_path / "none.npz")
    blob = rt.start([1, 2], 5).snapshot()
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "meta.npy":  # same header, keys removed from the JSON
                meta = json.loads(np.load(io.BytesIO(data)).tobytes())
                del meta["rng"], meta["tokens"]
                out = io.BytesIO()
                np.save(out, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
                data = out.getvalue()
            dst.writestr(name, data)
    with pytest.raises(SnapshotError, match="incomplete or malformed"):
        rt.restore(buf.getvalue())
    other = MambaRuntime(rt.info.path, provider="cpu", threads=1, verify=False)
    other.info = dataclasses.replace(other.info, export_id="0" * 16)
    with pytest.raises(SnapshotError, match="another export"):
        other.restore(blob)


def _edited_snapshot(blob: bytes, **changes) -> bytes:
    """The snapshot ``blob`` with arrays replaced (None: removed)."""
    with np.load(io.BytesIO(blob)) as z:
        arrays = {k: z[k] for k in z.files}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name, None)
        else:
            arrays[name] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_damaged_snapshots_are_snapshot_errors(rt):
    """States with NaN or infinity, pending ids outside the vocabulary, bad logits or header: SnapshotError, not an
    onnxruntime error or tokens drawn from NaN."""
    stepped = rt.start(PROMPTS[:2], 8, SAMPLED)
    stepped.step()
    pending = stepped.snapshot()  # holds the pending ids
    fresh = rt.start(PROMPTS[:2], 8, SAMPLED).snapshot()  # holds the prefill logits
    with np.load(io.BytesIO(pending)) as z:
        conv, ssm = z["conv"], z["ssm"]
    with np.load(io.BytesIO(fresh)) as z:
        logits = z["logits"]
    nan_conv, inf_ssm, inf_logits = conv.copy(), ssm.copy(), logits.copy()
    nan_conv[0, 1, 2, 0], inf_ssm[-1, 0, 0, 1], inf_logits[1, 3] = np.nan, np.inf, -np.inf
    cases = [
        (_edited_snapshot(pending, pending=np.array([999, 0])), "pending token id 999 is outside the vocabulary"),
        (_edited_snapshot(pending, pending=np.array([3, -1])), "pending token id -1 is outside the vocabulary"),
        (_edited_snapshot(pending, pending=np.array([1.0, 2.0])), "pending tokens are float64 (2,), expected integer"),
        (_edited_snapshot(pending, pending=np.array([1])), "pending tokens are int64 (1,)"),
        (_edited_snapshot(pending, conv=nan_conv), "conv state holds NaN or infinity"),
        (_edited_snapshot(pending, ssm=inf_ssm), "ssm state holds NaN or infinity"),
        (_edited_snapshot(pending, conv=conv.astype(np.int32)), "conv state is int32, expected floating-point numbers"),
        (_edited_snapshot(fresh, logits=inf_logits), "logits hold NaN or infinity"),
        (_edited_snapshot(fresh, logits=logits[:, :10]), "snapshot logits are float32 (2, 10)"),
        (_edited_snapshot(pending, pending=None), "either the pending tokens or the logits to sample from (found "
                                                  "neither)"),
        (_edited_snapshot(pending, logits=logits), "(found both)"),
        (_edited_snapshot(pending, meta=np.frombuffer(b"[1, 2]", dtype=np.uint8)), "header is a JSON list"),
        (_edited_snapshot(pending, meta=np.frombuffer(b"[" * 100000 + b"]" * 100000, dtype=np.uint8)),
         "header is not valid JSON: nesting deeper than 128"),
        (_edited_snapshot(pending, meta=np.frombuffer(b'{"a": 1', dtype=np.uint8)), "header is not valid JSON: "),
    ]
    for blob, message in cases:
        with pytest.raises(SnapshotError, match=re.escape(message)) as e:
            rt.restore(blob)
        assert "\n" not in str(e.value)
    assert rt.restore(pending).run().tokens == stepped.run().tokens  # the unedited one still restores


def test_non_finite_logits_are_refused_not_sampled(exp, rt, tmp_path, monkeypatch):
    """Damaged weights (0xff bytes are NaN floats; not seen with verify=False) make NaN logits: a ModelOutputError
    (as the C++ runtime refuses them), also from the CLI; not tokens drawn from NaN."""
    import shutil

    d = tmp_path / "export"
    shutil.copytree(exp.dir, d)
    size = (d / "weights.bin").stat().st_size
    (d / "weights.bin").write_bytes(b"\xff" * size)
    broken = MambaRuntime(d, provider="cpu", threads=1, verify=False)
    for sampling in (None, SAMPLED):
        with pytest.raises(ModelOutputError, match=r"non-finite logits \(NaN or infinity\) for new token 1 of "
                                                   r"sequence 0; its weights may be damaged") as e:
            broken.generate("x", 5, sampling)
        assert "\n" not in str(e.value)
    out = _cli("generate", str(d), "--prompt", "x", "--max-new-tokens", "5", "--no-verify", "--json")
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.count("\n") == 1 and "error: the model produced non-finite logits" in out.stderr, out.stderr
    # in a decode step, for one row of a batch: refused, and again on the next step (the tokens were fed)
    gen = rt.start(PROMPTS[:2], 8)
    gen.step()
    real_step = gen.state.step

    def nan_in_row_1(tokens):
        logits = np.array(real_step(tokens))
        logits[1, 7] = np.nan
        return logits

    monkeypatch.setattr(gen.state, "step", nan_in_row_1)
    for _ in range(2):
        with pytest.raises(ModelOutputError, match="for new token 2 of sequence 1"):
            gen.step()
    gen.finish_reasons[1] = "cancelled"  # a finished row's logits are not sampled, nor checked
    for _ in range(2):
        assert gen.step()[1] == -1


@pytest.mark.parametrize("call, message", [
    (lambda rt: rt.generate([1, 256], 5), "token id 256 at position 1 is outside the vocabulary"),
    (lambda rt: rt.generate([-1], 5), "token id -1 at position 0"),
    (lambda rt: rt.generate([], 5), "no prompt given"),
    (lambda rt: rt.generate([[1], []], 5), "prompt 1 is empty"),
    (lambda rt: rt.generate("", 5), "prompt 0 is empty"),
    (lambda rt: rt.generate([1.5, 2.0], 5), "integer token ids"),
    (lambda rt: rt.generate([1], 0), "max_new_tokens must be a positive integer"),
    (lambda rt: rt.generate([1], 5, stop_tokens=[999]), "stop tokens: token id 999"),
    (lambda rt: rt.generate([1], 5, stop_tokens=0), "stop_tokens must be a collection of token ids"),
    (lambda rt: rt.generate([[1]] * 257, 5), "batch of 257 prompts is over the limit of 256"),
    (lambda rt: rt.generate([[1], ["x"]], 5), "prompt 1: expected text or a flat list of integer token ids"),
    (lambda rt: rt.generate([[1, 2], [3, [4]]], 5), "prompt 1: expected text or a flat list of integer token ids"),
    (lambda rt: rt.generate([[1, 2], 3], 5), "prompt 1: expected text or a flat list of integer token ids"),
    (lambda rt: rt.generate(b"abc", 5), "prompt 0 is bytes: give text"),
    (lambda rt: rt.generate(["a", bytearray(b"b")], 5), "prompt 1 is bytes"),
    (lambda rt: rt.generate(5, 5), "prompts must be text, a list of token ids or a list of those, not int"),
    (lambda rt: rt.generate(np.int64(5), 5), "prompts must be text"),
    (lambda rt: rt.generate([1], 5, {"temperature": 1.0}), "sampling must be a SamplingConfig"),
    (lambda rt: rt.generate([1], "5"), "max_new_tokens must be a positive integer, found '5'"),
    (lambda rt: rt.generate([1], 2**31), "max_new_tokens must be at most 2147483647, found 2147483648"),
    (lambda rt: rt.generate([True, 2], 5), "prompt 0: expected text or a flat list of integer token ids"),
    (lambda rt: rt.generate([[1], [np.True_]], 5), "prompt 1: expected text or a flat list of integer token ids"),
    (lambda rt: rt.generate("a\ud800", 5), r"lone surrogate \(U\+D800\) at character 1"),
])
def test_bad_requests_are_one_line_errors(rt, call, message):
    with pytest.raises(GenerationInputError, match=message) as e:
        call(rt)
    assert "\n" not in str(e.value)


def test_numpy_numbers_are_accepted_for_counts_and_settings(rt):
    """max_new_tokens, prompt ids and sampling settings may be numpy scalars; they are kept as Python numbers, so a
    snapshot (JSON inside) of such a generation can be taken."""
    cfg = SamplingConfig(temperature=np.float32(1.3), top_k=np.int64(40), top_p=np.float64(0.95),
                         repetition_penalty=np.float32(1.3), seed=np.uint32(11))
    assert cfg.to_dict() == dict(temperature=pytest.approx(1.3), top_k=40, top_p=0.95,
                                 repetition_penalty=pytest.approx(1.3), seed=11)
    assert all(type(v) in (int, float) for v in cfg.to_dict().values())
    gen = rt.start(np.array(PROMPTS[0]), np.int64(6), SamplingConfig(top_k=np.int32(3), temperature=1, seed=2))
    gen.step()
    assert rt.restore(gen.snapshot()).run().tokens == gen.run().tokens


def test_an_export_named_relative_to_the_current_directory_loads_its_library(exp, rt, monkeypatch):
    """"." (and "./"): the custom-op library's path keeps a directory part, so dlopen does not search elsewhere; not
    a path at all is a one-line error."""
    if not library_built():
        pytest.skip("the custom-op library is not built")
    monkeypatch.chdir(exp.dir)
    for name in (".", "./"):
        here = MambaRuntime(name, provider="cpu", threads=1, custom_ops="require", verify=False)
        assert here.generate([5, 17, 200], 6).tokens == rt.generate([5, 17, 200], 6).tokens
    with pytest.raises(ExportDirError, match="must be a path"):
        MambaRuntime(None)


def test_token_ids_work_without_the_tokenizers_package(exp, rt, tmp_path, monkeypatch):
    """An export with a tokenizer.json on a runtime-only install (no ``tokenizers``): opening it and generating from
    token ids work (no texts); text input is the one-line error that says what to install."""
    import shutil

    d = tmp_path / "export"
    shutil.copytree(exp.dir, d)
    (d / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    no_tok = MambaRuntime(d, provider="cpu", threads=1, verify=False)
    result = no_tok.generate([5, 17, 200], 6)
    assert result.tokens == rt.generate([5, 17, 200], 6).tokens and result.texts is None
    with pytest.raises(ExportDirError, match="needs the 'tokenizers' package"):
        no_tok.generate("hello", 3)


@pytest.mark.parametrize("field, value, message", [("vocab_size", 1000, "logits over 256 tokens"),
                                                    ("d_state", 8, "past_ssm.0 has shape"),
                                                    ("n_layer", 100_000_000, "makes 200000001 of each"),
                                                    ("n_layer", 2**40, "more than any model")])
def test_a_manifest_that_disagrees_with_its_graphs_is_an_export_dir_error(exp, tmp_path, field, value, message):
    import shutil

    d = tmp_path / "export"
    shutil.copytree(exp.dir, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["config"][field] = value
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportDirError, match=message):
        MambaRuntime(d, provider="cpu", threads=1, verify=False)


def test_graphs_whose_logits_dtypes_differ_are_refused(exp, monkeypatch):
    """A decode.onnx from another export (float16 logits beside float32 prefill logits) is an ExportDirError, as in
    the C++ runtime, not garbage tokens."""
    import mamba_runtime.runtime as runtime_module

    dtypes = iter([np.dtype(np.float32), np.dtype(np.float16)])
    monkeypatch.setattr(runtime_module, "check_io", lambda *a: next(dtypes))
    with pytest.raises(ExportDirError, match="decode.onnx: logits are float16, but model_last.onnx's are float32"):
        MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False)


def test_text_without_a_tokenizer_is_an_error(exp):
    rt = MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False)
    rt.codec = None  # as for an export without tokenizer files
    with pytest.raises(GenerationInputError, match="needs a tokenizer"):
        rt.generate("hello", 3)


def test_the_function_fallback_gives_the_same_tokens_and_is_announced(exp, rt, monkeypatch):
    off = MambaRuntime(exp.dir, provider="cpu", threads=1, custom_ops="off", verify=False)
    assert off.custom_op_library is None
    assert off.generate(PROMPTS, 12, SAMPLED).tokens == rt.generate(PROMPTS, 12, SAMPLED).tokens

    def missing():
        raise MambaExportError("not built")

    monkeypatch.setattr("mamba_runtime.sessions.custom_op_library_path", missing)
    no_lib = dataclasses.replace(rt.info, library=None)
    with pytest.warns(CustomOpsFallbackWarning, match="function fallbacks"):
        assert resolve_library(no_lib, "auto") is None
    with pytest.raises(MambaExportError, match="ships no custom-op library"):
        resolve_library(no_lib, "require")


def test_an_ops_library_variable_naming_no_file_is_an_error_wherever_the_library_is_looked_up(exp, rt, tmp_path,
                                                                                              monkeypatch):
    """$MAMBA_EXPORT_OPS_LIBRARY with a typo fell through to the package's library: the build meant to be tested
    silently was not. Now a one-line error naming the variable and the path (unless custom ops are off)."""
    from mamba_runtime import custom_op_library_path
    from mamba_runtime.library import ENV_VAR

    for bad, what in ((tmp_path / "typo.so", "does not exist"), (tmp_path, "is not a file")):
        monkeypatch.setenv(ENV_VAR, str(bad))
        message = f"{ENV_VAR} is set to '{bad}', which {what}"
        with pytest.raises(MambaExportError, match=re.escape(message)):
            custom_op_library_path()
        with pytest.raises(MambaExportError, match=re.escape(message)):  # though the export ships its own copy
            MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False)
        with pytest.raises(MambaExportError, match=re.escape(message)):
            resolve_library(dataclasses.replace(rt.info, library=None), "auto")  # not a fallback warning
        off = MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False, custom_ops="off")
        assert off.custom_op_library is None
        out = subprocess.run([sys.executable, "-m", "mamba_export.cli", "generate", str(exp.dir), "--prompt-ids", "1"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, ENV_VAR: str(bad)})
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    monkeypatch.delenv(ENV_VAR)
    if library_built():
        built = custom_op_library_path()
        monkeypatch.setenv(ENV_VAR, built)
        assert custom_op_library_path() == built
    monkeypatch.setenv(ENV_VAR, "")  # empty: as unset
    assert MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False).custom_op_library == rt.custom_op_library


def test_resident_memory_stays_flat_over_5000_decode_steps(rt):
    psutil = pytest.importorskip("psutil")
    gen = rt.start([1, 2, 3], 6000, SAMPLED)
    for _ in range(500):
        gen.step()
    before = psutil.Process().memory_info().rss
    for _ in range(5000):
        gen.step()
    growth = psutil.Process().memory_info().rss - before
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 5000 steps"


# ---- the CLI --------------------------------------------------------------------------------------------------------
def _cli(*args, block_torch=False):
    """Run the CLI in a fresh interpreter; stdout/stderr as str without newline translation."""
    prelude = "sys.modules['torch'] = None; " if block_torch else ""
    code = "import sys; " + prelude + "from mamba_export.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120)
    return SimpleNamespace(returncode=out.returncode, stdout=out.stdout.decode(), stderr=out.stderr.decode())


def test_every_runtime_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import pkgutil, importlib, mamba_runtime; "
            "[importlib.import_module('mamba_runtime.' + m.name) "
            "for m in pkgutil.iter_modules(mamba_runtime.__path__)]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("command", ["export", "inspect", "train"])
def test_commands_that_need_torch_say_so_on_a_runtime_only_install(exp, tmp_path, command):
    """Without torch (the runtime-only install), export, inspect and train end with one line naming the extra to
    install, exit status 2, not an ImportError traceback."""
    args = {"export": ["export", str(exp.root / "ckpt"), "-o", str(tmp_path / "x")],
            "inspect": ["inspect", str(exp.root / "ckpt")],
            "train": ["train", "--data", str(tmp_path / "t.txt"), "--preset", "tiny", "-o", str(tmp_path / "c")]}
    (tmp_path / "t.txt").write_text("text " * 2000)
    out = _cli(*args[command], block_torch=True)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    root = Path(__file__).resolve().parents[1]  # installed editable from this checkout, as tools/setup.sh does
    assert "needs 'torch'" in err[0] and f"(pip install '{root}[export]')" in err[0]  # not on PyPI: the checkout's


def test_cli_generate_runs_without_torch_and_matches_the_api(exp, rt):
    out = _cli("generate", str(exp.dir), "--prompt", "héllo", "--max-new-tokens", "9", "--json", "--threads", "1",
               block_torch=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = rt.generate("héllo", 9)
    assert got["tokens"] == want.tokens[0] and got["text"] == want.texts[0]
    assert set(got["timings"]) >= {"prefill_ms", "ttft_ms", "decode_ms_per_step", "tokens_per_s"}
    sampled = _cli("generate", str(exp.dir), "--prompt-ids", "5,17,200,3,9", "--max-new-tokens", "12", "--stream",
                   "--temperature", "1.3", "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.3",
                   "--seed", "11", block_torch=True)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout == rt.decode(rt.generate(PROMPTS[0], 12, SAMPLED).tokens[0]) + "\n"


def test_a_graph_onnxruntime_cannot_load_is_one_line_without_its_log(exp, tmp_path):
    """weights.bin cut short: onnxruntime printed its multi-line, coloured ERROR log before our line; now only our
    line, with onnxruntime's innermost message (not the C++ signatures of the functions that rethrew it)."""
    import shutil

    d = tmp_path / "export"
    shutil.copytree(exp.dir, d)
    os.truncate(d / "weights.bin", 1000)
    out = _cli("generate", str(d), "--prompt", "x", "--no-verify")
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mamba-export generate: error: {d / 'model_last.onnx'}: onnxruntime cannot load it (")
    assert "onnxruntime::" not in lines[0] and "[ONNXRuntimeError]" not in lines[0]


def test_weight_files_are_checked_while_they_load_and_a_damaged_one_is_still_refused(exp, tmp_path, monkeypatch):
    """The sha256 of weights.bin runs in a thread while onnxruntime loads the sessions (every other file is checked
    before anything reads it); the open still fails on a damaged weights.bin, with the checksum's message also where
    onnxruntime could not load the file at all."""
    import shutil
    import threading

    from mamba_runtime import manifest

    seen = {}
    real = manifest.sha256_file

    def spy(path, *args):
        seen[os.path.basename(path)] = threading.current_thread().name
        return real(path, *args)

    monkeypatch.setattr(manifest, "sha256_file", spy)
    MambaRuntime(exp.dir, provider="cpu", threads=1)
    assert seen.pop("weights.bin") == "mamba-weight-check"
    assert {"model.onnx", "decode.onnx"} <= set(seen) and set(seen.values()) == {threading.main_thread().name}, seen

    d = tmp_path / "export"
    shutil.copytree(exp.dir, d)
    data = bytearray((d / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 1  # one bit: the sessions load, the numbers are wrong
    (d / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match=r"weights.bin: sha256 does not match manifest.json"):
        MambaRuntime(d, provider="cpu", threads=1)
    os.truncate(d / "weights.bin", 1000)  # onnxruntime cannot load it: the checksum's message, not onnxruntime's
    with pytest.raises(ExportDirError, match=r"weights.bin: sha256 does not match manifest.json"):
        MambaRuntime(d, provider="cpu", threads=1)


def test_ort_config_reaches_both_sessions_and_changes_no_token(exp, rt, capsys):
    """ort_config (--ort-config) sets onnxruntime session config entries on both sessions, as the C++ runtime's
    ort_config does; disabling pre-packing (the weights then stay memory-mapped and shared) gives the same tokens."""
    from mamba_export.cli import main

    def prepacking_off(session):
        try:
            return session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # onnxruntime: "SessionOptions does not have configuration with key ..."
            return False

    lean = MambaRuntime(exp.dir, provider="cpu", threads=1, ort_config={"session.disable_prepacking": "1"})
    assert prepacking_off(lean.prefill_session) and prepacking_off(lean.decode_session)
    assert not prepacking_off(rt.prefill_session) and not prepacking_off(rt.decode_session)
    assert lean.generate(PROMPTS, 12, SAMPLED).tokens == rt.generate(PROMPTS, 12, SAMPLED).tokens
    for bad in ({"session.disable_prepacking": 1}, [("a", "b")]):
        with pytest.raises(GenerationInputError, match="ort_config must map onnxruntime session config keys"):
            MambaRuntime(exp.dir, provider="cpu", threads=1, ort_config=bad)
    assert main(["generate", str(exp.dir), "--prompt-ids", "5,17", "--max-new-tokens", "6", "--threads", "1", "--json",
                 "--ort-config", "session.disable_prepacking=1", "--ort-config", "session.use_env_allocators=0"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == rt.generate([5, 17], 6).tokens[0]


def test_onnxruntime_messages_are_cut_to_their_innermost_status():
    from mamba_runtime.sessions import ort_message

    nested = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: a.cc:74 f(const g&) "
                          "[ONNXRuntimeError] : 1 : FAIL : t.cc:2201 offset 9216 out of bounds\nmore\n")
    assert ort_message(nested) == "t.cc:2201 offset 9216 out of bounds"
    assert ort_message(RuntimeError("plain message\nsecond line")) == "plain message"
    assert ort_message(RuntimeError("")) == "RuntimeError"


def test_cli_prints_ids_the_same_streamed_or_not(exp, capsys, monkeypatch):
    """Without a tokenizer the ids are printed comma-separated, as --prompt-ids takes them, with --stream too."""
    import mamba_runtime.runtime as runtime_module
    from mamba_export.cli import main

    monkeypatch.setattr(runtime_module, "load_codec", lambda path: None)
    outs = []
    for extra in ([], ["--stream"]):
        assert main(["generate", str(exp.dir), "--prompt-ids", "5,17,200", "--max-new-tokens", "6", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count(",") == 5 and " " not in outs[0]


def test_cli_json_reports_the_seed_drawn_so_that_a_sample_can_be_repeated(exp, capsys):
    from mamba_export.cli import main

    def sample(*extra):
        assert main(["generate", str(exp.dir), "--prompt-ids", "5,17,200", "--max-new-tokens", "12", "--json",
                     "--temperature", "1.5", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    first = sample()
    seed = first["sampling"]["seed"]
    assert isinstance(seed, int)
    again = sample("--seed", str(seed))
    assert again["tokens"] == first["tokens"] and again["sampling"] == first["sampling"]
    assert main(["generate", str(exp.dir), "--prompt-ids", "5", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"]["seed"] is None  # greedy


def test_cli_prompt_bytes_that_are_not_utf8_reach_a_byte_level_model(exp, capsys):
    """A shell passes `--prompt $'And \\xff'` as bytes; Python gives them as surrogateescape, and the byte-level model
    gets the very bytes (not a traceback)."""
    from mamba_export.cli import main

    prompt = b"And \xff".decode("utf-8", "surrogateescape")
    assert main(["generate", str(exp.dir), "--prompt", prompt, "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == list(b"And \xff")


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/export", "--prompt-ids", "1"], "export directory does not exist"),
    (["{dir}", "--prompt-ids", "1,999"], "token id 999"),
    (["{dir}", "--prompt-ids", "1", "--top-k", "5"], "--top-k applies to sampling: also give --temperature"),
    (["{dir}", "--prompt-ids", "1", "--seed", "3", "--top-p", "0.5"],
     "--top-p/--seed apply to sampling: also give --temperature"),
    (["{dir}", "--prompt-ids", "1", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["{dir}", "--prompt-ids", "1", "--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["{dir}", "--prompt-ids", "1,,2"], "expected comma-separated integers"),
    (["{dir}", "--prompt-ids", "99999999999999999999999"], "below 2**63"),
    (["{dir}", "--prompt-ids", "a"], "expected comma-separated integers"),
    (["{dir}", "--prompt-ids", "1", "--provider", "tpu"], "invalid choice"),
    (["{dir}", "--prompt-ids", "1", "--ort-config", "novalue"], "--ort-config: expected KEY=VALUE"),
    # the runtime's checks, named by the command's flags (not the Python parameters)
    (["{dir}", "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["{dir}", "--prompt-ids", "1", "--max-new-tokens", "99999999999999999999"],
     "--max-new-tokens must be at most 2147483647"),
    (["{dir}", "--prompt-ids", "1", "--threads", "0"], "--threads must be a positive integer, found 0"),
    (["{dir}", "--prompt-ids", "1", "--temperature", "1", "--top-p", "2"], "--top-p must be in (0, 1], found 2.0"),
    (["{dir}", "--prompt-ids", "1", "--temperature", "1", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["{dir}", "--prompt-ids", "1", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["{dir}", "--prompt-ids", "1", "--temperature", "1", "--seed", "-3"], "--seed must be an integer >= 0, found -3"),
    (["{dir}", "--prompt-ids", "1", "--stop-ids", "7,999"], "--stop-ids: token id 999 at position 1 is outside"),
    (["{dir}", "--prompt-ids", "1,999"], "--prompt-ids: token id 999 at position 1 is outside the vocabulary"),
    (["{dir}", "--prompt-ids", ""], "--prompt-ids is empty: give at least one token"),
    (["{dir}", "--prompt", ""], "--prompt is empty: give at least one token"),
])
def test_cli_generate_bad_input_exits_2_with_one_line(exp, args, message, capsys):
    """Mistakes found by the command and by its argument parser alike: exit status 2 and one line on stderr."""
    from mamba_export.cli import main

    try:
        rc = main(["generate", *[a.format(dir=exp.dir) for a in args]])
    except SystemExit as e:  # the argument parser's errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "error:" in err[0]


# ---- node placement under a GPU provider --------------------------------------------------------------------------
def test_compute_nodes_on_cpu_are_the_custom_ops_and_matmuls_of_the_cpu_provider():
    from mamba_runtime.sessions import compute_nodes_on_cpu

    groups = [("CUDAExecutionProvider", [("ai.mamba_export", "DecodeStep", "d0"), ("", "MatMul", "m0")]),
              ("CPUExecutionProvider", [("", "Shape", "s"), ("", "Gather", "g"), ("", "Concat", "c"),
                                        ("", "MatMul", "m1"), ("ai.mamba_export", "LinearF16W", "l1")])]
    assert compute_nodes_on_cpu(groups) == [("LinearF16W", "l1"), ("MatMul", "m1")]
    assert compute_nodes_on_cpu(groups[:1]) == []


@pytest.mark.skipif(not library_built(), reason="custom-op library not built")
def test_cpu_placement_is_read_from_onnxruntime_and_warned_about(exp):
    """What a GPU provider's session does (the option on, the check after opening), on the CPU provider: every node
    is on the CPU there, so the decode graph's DecodeStep, norms and MatMuls are all reported."""
    from mamba_runtime import CpuPlacementWarning
    from mamba_runtime.sessions import _ASSIGNMENT_KEY, cpu_placed_nodes, warn_cpu_placement

    so = session_options(1, resolve_library(MambaRuntime(exp.dir, provider="cpu").info, "require"))
    so.add_session_config_entry(_ASSIGNMENT_KEY, "1")
    session = open_session(exp.dir / "decode.onnx", so, ["CPUExecutionProvider"])
    nodes = cpu_placed_nodes(session)
    if nodes is None:
        pytest.skip("this onnxruntime does not report its node assignment")
    ops = [op for op, _ in nodes]
    n_layer = exp.model.config.n_layer
    assert ops.count("DecodeStep") == n_layer and ops.count("MatMul") == 2 * n_layer + 1
    assert ops.count("AddRMSNorm") == n_layer and ops.count("RMSNorm") == 1 and "Gather" not in ops
    placed = rf"placed {len(nodes)} compute nodes on the CPU .*DecodeStep x{n_layer}"
    with pytest.warns(CpuPlacementWarning, match=placed):
        warn_cpu_placement(session, exp.dir / "decode.onnx")


def test_profile_report_names_the_cpu_placed_nodes_under_a_gpu_provider():
    from mamba_export.commands.profile import _placement

    report = {"settings": {"provider": "cuda"},
              "cpu_placed_nodes": {"model_last.onnx": [], "decode.onnx": [["LinearF16W", "node_linear"]]}}
    assert _placement(report) == ["compute nodes on the CPU: model_last.onnx none; decode.onnx LinearF16W node_linear"]
    assert _placement({"settings": {"provider": "cpu"}, "cpu_placed_nodes": {}}) == []
    report["cpu_placed_nodes"] = {"decode.onnx": None}
    assert _placement(report) == ["compute nodes on the CPU: decode.onnx not reported by this onnxruntime"]


def test_stream_takes_one_prompt_and_checks_it_in_the_call(rt):
    """A batch given to stream() was half-served (row 0, then -1s); a bad id failed only at the first next(), i.e.
    after a server had started its response. Both are errors of the call itself now."""
    with pytest.raises(GenerationInputError, match="stream takes one prompt, found a batch of 2"):
        rt.stream([[1, 2], [3]], 5)
    with pytest.raises(GenerationInputError, match="stream_text takes one prompt, found a batch of 2"):
        rt.stream_text(["ab", "cd"], 5)
    with pytest.raises(GenerationInputError, match="outside the vocabulary"):
        rt.stream([1, 10**6], 5)  # no next() needed
    assert list(rt.stream([[5, 17]], 6)) == rt.generate([5, 17], 6).tokens[0]  # a batch of one is one prompt


def test_one_runtime_serves_threads_and_a_generation_refuses_a_second_thread(rt):
    """Threads sharing one MambaRuntime (a server's request handlers), each with its own generations, get exactly
    the tokens of the same calls made one after another. A Generation stepped from a second thread while a step
    runs is refused with one line instead of mixing the two threads' tokens."""
    import threading

    prompts = [[i % 200 + 1, 7, i % 13 + 2] * (1 + i % 4) for i in range(12)]
    want = [rt.generate(p, 12, SAMPLED).tokens[0] for p in prompts]
    got: dict[int, list[int]] = {}

    def worker(k: int) -> None:
        for i in range(k, len(prompts), 4):
            got[i] = rt.generate(prompts[i], 12, SAMPLED).tokens[0] if i % 2 else list(rt.stream(prompts[i], 12,
                                                                                                     SAMPLED))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == want

    gen = rt.start(PROMPTS, 5)
    inside, tried, refusal = threading.Event(), threading.Event(), []
    real_step = gen.state.step

    def slow_step(ids):
        inside.set()
        assert tried.wait(30)
        return real_step(ids)

    def intruder():
        assert inside.wait(30)
        try:
            gen.step()
        except GenerationInputError as e:
            refusal.append(str(e))
        tried.set()

    gen.step()  # the first step samples from the prefill's logits; the next one runs the state's step
    gen.state.step = slow_step
    other = threading.Thread(target=intruder)
    other.start()
    gen.step()
    other.join()
    assert refusal and "being stepped by another thread" in refusal[0]
    gen.state.step = real_step
    assert gen.run().tokens == rt.generate(PROMPTS, 5).tokens  # undisturbed


def test_cancelling_some_rows_leaves_the_others_untouched(rt):
    """A server batching requests cancels one of them: the other rows continue with exactly their own tokens."""
    want = rt.generate(PROMPTS, 10, SAMPLED)
    gen = rt.start(PROMPTS, 10, SAMPLED)
    gen.step()
    gen.step()
    gen.cancel([1, np.int64(3)])
    gen.cancel(1)  # again, and as a bare index: no change
    result = gen.run()
    assert result.finish_reasons[1] == result.finish_reasons[3] == "cancelled"
    assert result.tokens[1] == want.tokens[1][:2] and result.tokens[3] == want.tokens[3][:2]
    assert [result.tokens[0], result.tokens[2]] == [want.tokens[0], want.tokens[2]]
    with pytest.raises(GenerationInputError, match="row 4 is outside this batch of 4"):
        rt.start(PROMPTS, 3).cancel([4])
    with pytest.raises(GenerationInputError, match="row must be a non-negative integer"):
        rt.start(PROMPTS, 3).cancel(["0"])


def test_mutated_manifests_raise_the_runtimes_errors_or_run(exp, tmp_path):
    """80 seeded damaged manifest.json files (odd values, missing or extra keys, broken syntax, truncation):
    MambaRuntime opens and generates, or raises one of the runtime's errors (MambaExportError), never another
    exception."""
    from mamba_export.errors import MambaExportError
    from support import mutated_manifests, refusals

    target = tmp_path / "copy"
    shutil.copytree(exp.dir, target)
    original = (exp.dir / "manifest.json").read_text()

    def attempt(data: bytes) -> None:
        (target / "manifest.json").write_bytes(data)
        MambaRuntime(target, provider="cpu", threads=1).generate([1, 2], 2)

    refused = refusals(mutated_manifests(original, 80, seed=6), attempt, MambaExportError)
    assert len(refused) >= 25  # many mutations break the manifest (the rest change fields nobody reads)


def test_mutated_snapshot_headers_raise_snapshot_errors_or_run(rt):
    """60 seeded damaged snapshot headers (odd values, missing or extra keys, broken JSON): restore and run, or a
    SnapshotError at restore; never another exception at restore or in a later step (tokens such as "x" or 1.5 had
    surfaced as TypeErrors in the next step)."""
    from support import mutated_manifests, refusals

    from mamba_runtime import SnapshotError

    gen = rt.start(["ab", "abcdef"], 8, SAMPLED, stop_tokens=[7])
    gen.step()
    with np.load(io.BytesIO(gen.snapshot()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}

    def attempt(header: bytes) -> None:
        blob = io.BytesIO()
        np.savez(blob, **{**arrays, "meta": np.frombuffer(header, np.uint8)})
        rt.restore(blob.getvalue()).run()

    refused = refusals(mutated_manifests(arrays["meta"].tobytes().decode(), 60, seed=2), attempt, SnapshotError)
    assert len(refused) >= 30


@pytest.mark.parametrize("first", ["length", "stop", "cancelled", "cancelled-at-once", "restored"])
def test_follow_continues_a_conversation_as_one_prompt_of_its_whole_history(rt, first):
    """follow() gives the tokens of start(history + next prompt) with the same settings, greedy and sampled (the
    repetition penalty counting the history): after a turn that ran to its length, hit a stop token, was cancelled
    mid-way or before its first token, or came back from a snapshot; and a third turn after the second."""
    for sampling in (None, SAMPLED):
        stops = [int(rt.generate([PROMPTS[0]], 6, sampling).tokens[0][3])] if first == "stop" else []
        gen = rt.start(PROMPTS[0], 6, sampling, stop_tokens=stops)
        if first == "cancelled":
            gen.step(), gen.step(), gen.cancel()
        elif first == "cancelled-at-once":
            gen.cancel()
        else:
            gen.run()
        if first == "stop":
            assert gen.finish_reasons == ["stop"] and gen.tokens[0][-1] == stops[0]
        if first == "restored":
            gen = rt.restore(gen.snapshot())
        history = PROMPTS[0] + gen.tokens[0]
        second = gen.follow(PROMPTS[2], 7)
        got = second.run()
        want = rt.generate([history + PROMPTS[2]], 7, sampling, stop_tokens=stops)
        assert got.tokens == want.tokens and got.prompts == [PROMPTS[2]]
        third = second.follow("ab", 5).run()
        want = rt.generate([history + PROMPTS[2] + got.tokens[0] + rt.encode("ab")], 5, sampling, stop_tokens=stops)
        assert third.tokens == want.tokens


def test_follow_refuses_what_it_cannot_continue(rt):
    batch = rt.start([PROMPTS[0], PROMPTS[1]], 3)
    batch.run()
    with pytest.raises(GenerationInputError, match=r"^follow\(\) continues one sequence; this generation has 2"):
        batch.follow([1], 3)
    running = rt.start(PROMPTS[0], 3)
    with pytest.raises(GenerationInputError, match=r"^follow\(\) continues a finished generation"):
        running.follow([1], 3)
    running.run()
    with pytest.raises(GenerationInputError, match=r"^follow\(\) takes one prompt, found 2"):
        running.follow([[1], [2]], 3)
    with pytest.raises(GenerationInputError, match="no prompt given"):
        running.follow([], 3)
    with pytest.raises(GenerationInputError, match="max_new_tokens"):
        running.follow([1], 0)
    assert running.follow([1], 2).run().tokens == rt.generate([PROMPTS[0] + running.tokens[0] + [1]], 2).tokens


def test_a_restored_greedy_run_reports_no_seed(rt):
    """result().seed of a greedy run is its config's seed as given (None), after a snapshot and restore too; a sampled
    run keeps the seed it drew."""
    gen = rt.start(PROMPTS[0], 4)
    gen.step()
    assert gen.result().seed is None and rt.restore(gen.snapshot()).run().seed is None
    gen = rt.start(PROMPTS[0], 4, SamplingConfig(temperature=1.0))
    gen.step()
    assert rt.restore(gen.snapshot()).run().seed == gen.run().seed is not None


# ---- stop strings -------------------------------------------------------------------------------------------------
def _complete_text(tokens: list[int]) -> str:
    """The complete characters of byte tokens (a character still cut at the end is not there yet), decoded with the
    standard library, not the runtime's codec."""
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(bytes(tokens))


def _stopped(tokens: list[int], strings: list[str]):
    """Brute force: the tokens up to the first one whose text holds a stop string, and the text before the earliest
    match; None when no prefix matches."""
    for n in range(1, len(tokens) + 1):
        text = _complete_text(tokens[:n])
        if starts := [text.find(s) for s in strings if s in text]:
            return tokens[:n], text[:min(starts)]
    return None


def _stop_string_of(rt, prompt, n, sampling):
    """Two characters from the middle of a generation's text, and the generation."""
    full = rt.generate(prompt, n, sampling)
    text = _complete_text(full.tokens[0])
    k = len(text) // 2
    return text[k:k + 2], full


def test_stop_strings_end_each_row_at_its_first_match_and_cut_its_text(rt):
    """Each row of a sampled batch ends at the token that completes the first match of a stop string in its own
    generated text (the prompt is not searched), its text cut where the match starts; a row without a match runs
    as it would without stop strings."""
    s, _ = _stop_string_of(rt, PROMPTS[0], 40, SAMPLED)
    full = rt.generate(PROMPTS, 40, SAMPLED)
    strings = [s, "never\x00here"]
    result = rt.generate(PROMPTS, 40, SAMPLED, stop_strings=strings)
    stopped_rows = 0
    for row in range(len(PROMPTS)):
        want = _stopped(full.tokens[row], strings)
        if want is None:
            assert result.tokens[row] == full.tokens[row] and result.finish_reasons[row] == full.finish_reasons[row]
            assert result.texts[row] == full.texts[row]
        else:
            stopped_rows += 1
            assert result.tokens[row] == want[0] and result.finish_reasons[row] == "stop"
            assert result.texts[row] == want[1] and s not in result.texts[row]
    assert stopped_rows >= 1 and len(result.tokens[0]) < 40


def test_streamed_text_and_ids_with_stop_strings_are_those_of_the_result(rt):
    """stream_text never shows the stop string nor anything after it, and shows exactly the result's text; stream
    yields the result's ids, the completing token last."""
    s, _ = _stop_string_of(rt, PROMPTS[2], 40, SAMPLED)
    result = rt.generate(PROMPTS[2], 40, SAMPLED, stop_strings=s)
    assert result.finish_reasons == ["stop"]
    pieces = list(rt.stream_text(PROMPTS[2], 40, SAMPLED, stop_strings=s))
    assert "".join(pieces) == result.texts[0] and not any(s in p for p in pieces)
    assert list(rt.stream(PROMPTS[2], 40, SAMPLED, stop_strings=s)) == result.tokens[0]
    # a stop token still ends it first where it comes first, and stays out of the text
    first = result.tokens[0][0]
    early = rt.generate(PROMPTS[2], 40, SAMPLED, stop_tokens=[first], stop_strings=s)
    assert early.tokens == [[first]] and early.texts == [""]


@pytest.mark.parametrize("when", [0, 3])
def test_a_snapshot_keeps_its_stop_strings(rt, when):
    s, _ = _stop_string_of(rt, PROMPTS[0], 40, SAMPLED)
    want = rt.generate(PROMPTS, 40, SAMPLED, stop_strings=[s])
    gen = rt.start(PROMPTS, 40, SAMPLED, stop_strings=[s])
    for _ in range(when):
        gen.step()
    restored = rt.restore(gen.snapshot())
    assert restored.stop_strings == (s,)
    got = restored.run()
    assert (got.tokens, got.texts, got.finish_reasons) == (want.tokens, want.texts, want.finish_reasons)
    # a finished generation restored: its texts are cut as before (the text is decoded again from the tokens)
    assert rt.restore(restored.snapshot()).result().texts == want.texts


def test_a_snapshot_header_without_stop_strings_restores_without_them_and_a_bad_one_is_refused(rt):
    """Snapshots written before stop strings existed have no "stop_strings" key; a damaged one is a SnapshotError."""
    gen = rt.start(PROMPTS[0], 5, stop_strings=["x"])
    blob = gen.snapshot()
    with np.load(io.BytesIO(blob)) as z:
        meta = json.loads(z["meta"].tobytes())
    for value, ok in ((None, True), ([], True), ([""], False), (["a", 3], False), ("ab", False)):
        edited = {k: v for k, v in meta.items() if k != "stop_strings"}
        if value is not None:
            edited["stop_strings"] = value
        changed = _edited_snapshot(blob, meta=np.frombuffer(json.dumps(edited).encode(), dtype=np.uint8))
        if ok:
            assert rt.restore(changed).stop_strings == ()
        else:
            with pytest.raises(SnapshotError, match="stop_strings must be a list of non-empty strings"):
                rt.restore(changed)


def test_follow_keeps_the_stop_strings_and_searches_only_the_new_turn(rt):
    s, _ = _stop_string_of(rt, PROMPTS[0], 40, None)
    gen = rt.start(PROMPTS[0], 40, stop_strings=[s])
    gen.run()
    assert gen.finish_reasons == ["stop"]
    history = PROMPTS[0] + gen.tokens[0]
    second = gen.follow(PROMPTS[1], 40)
    assert second.stop_strings == (s,)
    got = second.run()
    want = rt.generate([history + PROMPTS[1]], 40, stop_strings=[s])
    assert got.tokens == want.tokens and got.texts == want.texts
    assert gen.follow(PROMPTS[1], 40, stop_strings=()).run().tokens == rt.generate([history + PROMPTS[1]], 40).tokens


@pytest.mark.parametrize("strings, message", [
    ([""], r"stop strings must not be empty: an empty one would stop at once \(item 0\)"),
    (["a", 3], r"stop strings must be strings, found int \(item 1\)"),
    (5, "stop strings must be a string or a list of strings, not int"),
])
def test_bad_stop_strings_are_one_line_errors(rt, strings, message):
    with pytest.raises(GenerationInputError, match=message):
        rt.generate([1], 5, stop_strings=strings)


def test_stop_strings_without_a_tokenizer_are_an_error(exp):
    rt = MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False)
    rt.codec = None  # as for an export without tokenizer files
    with pytest.raises(GenerationInputError, match="stop strings: matching them needs a tokenizer"):
        rt.generate([1, 2], 3, stop_strings=["a"])
    assert rt.generate([1, 2], 3, stop_strings=[]).tokens  # none given: nothing needs a tokenizer
    with_text = MambaRuntime(exp.dir, provider="cpu", threads=1, verify=False)
    blob = with_text.start([1, 2], 3, stop_strings=["a"]).snapshot()
    with pytest.raises(SnapshotError, match="snapshot has stop strings, and matching them needs a tokenizer"):
        rt.restore(blob)


def test_cli_stop_prints_the_apis_text_streamed_or_not(exp, rt, capsys):
    from mamba_export.cli import main

    s, _ = _stop_string_of(rt, "And", 40, None)
    want = rt.generate("And", 40, stop_strings=[s, "zz"])
    assert want.finish_reasons == ["stop"]
    base = ["generate", str(exp.dir), "--prompt", "And", "--max-new-tokens", "40", "--stop", s, "--stop", "zz"]
    assert main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == want.tokens[0] and out["text"] == want.texts[0] and out["finish_reason"] == "stop"
    for extra in ([], ["--stream"]):
        assert main([*base, *extra]) == 0
        assert capsys.readouterr().out == want.texts[0] + "\n"


def test_cli_stop_errors_are_one_line(exp, capsys, monkeypatch):
    import mamba_runtime.runtime as runtime_module
    from mamba_export.cli import main

    assert main(["generate", str(exp.dir), "--prompt-ids", "1", "--stop", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop must not be empty" in err[0]
    assert main(["generate", str(exp.dir), "--prompt-ids", "1", "--stop", os.fsdecode(b"a\x80")]) == 2  # not UTF-8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop must be Unicode text: item 0 has a lone surrogate (U+DC80)" in err[0]
    monkeypatch.setattr(runtime_module, "load_codec", lambda path: None)
    assert main(["generate", str(exp.dir), "--prompt-ids", "1", "--stop", "a", "--stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stop: matching them needs a tokenizer" in err[0] and "use --stop-ids" in err[0]


# ---- log-probabilities --------------------------------------------------------------------------------------------
def _reference_logprobs(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The reference model's log softmax at each generated token, in float64, from one forward over prompt + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0][0].double()
    steps = logits[len(prompt) - 1:len(prompt) + len(tokens) - 1]
    return torch.log_softmax(steps, dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_logprobs_are_the_models_log_softmax_at_each_generated_token(exp, rt, sampling):
    """Per row of an uneven batch, every generated token's log-probability is the reference model's log softmax of
    its raw logits (sampled with temperature, top-k, top-p and a repetition penalty too: those shape the draw, not
    the reported probability); a row that stops early has one per token; without logprobs=True there are none."""
    stop = rt.generate(PROMPTS, 3, sampling).tokens[1][2]
    result = rt.generate(PROMPTS, 12, sampling, stop_tokens=[stop], logprobs=True)
    assert result.finish_reasons[1] == "stop"
    for prompt, tokens, logprobs in zip(PROMPTS, result.tokens, result.logprobs, strict=True):
        assert len(logprobs) == len(tokens)
        np.testing.assert_allclose(logprobs, _reference_logprobs(exp.model, prompt, tokens), atol=2e-4)
    if sampling is not None:  # the draw's own distribution differs: the check above would fail for it
        assert any(lp < -2 for lp in itertools.chain.from_iterable(result.logprobs))
    assert rt.generate(PROMPTS, 12, sampling, stop_tokens=[stop]).logprobs is None


def test_logprobs_survive_a_snapshot_and_follow_keeps_them(exp, rt):
    want = rt.generate(PROMPTS, 10, SAMPLED, logprobs=True)
    gen = rt.start(PROMPTS, 10, SAMPLED, logprobs=True)
    gen.step(), gen.step()
    got = rt.restore(gen.snapshot()).run()
    assert got.tokens == want.tokens and got.logprobs == want.logprobs
    one = rt.start(PROMPTS[0], 4, logprobs=True)
    one.run()
    second = one.follow(PROMPTS[2], 5).run()
    history = PROMPTS[0] + one.tokens[0] + PROMPTS[2]
    np.testing.assert_allclose(second.logprobs[0], _reference_logprobs(exp.model, history, second.tokens[0]),
                               atol=2e-4)
    assert one.follow(PROMPTS[2], 5, logprobs=False).run().logprobs is None


def test_snapshot_logprobs_old_absent_or_damaged(rt):
    gen = rt.start(PROMPTS[:2], 5, logprobs=True)
    gen.step()
    blob = gen.snapshot()
    with np.load(io.BytesIO(blob)) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["logprobs"] == gen.logprobs and len(meta["logprobs"][0]) == 1
    for value, ok in (("absent", True), (None, True), ([[-1.0]], False), ([[-1.0], ["x"]], False),
                      ([[-1.0], [-1.0, -2.0]], False), ([[-1.0], [True]], False), ([[-1.0], [0.5]], False)):
        edited = {k: v for k, v in meta.items() if k != "logprobs"}
        if value != "absent":
            edited["logprobs"] = value
        changed = _edited_snapshot(blob, meta=np.frombuffer(json.dumps(edited).encode(), dtype=np.uint8))
        if ok:
            assert rt.restore(changed).run().logprobs is None
        else:
            with pytest.raises(SnapshotError, match="logprobs must be null or, per sequence, one finite number <= 0"):
                rt.restore(changed)


def test_logprobs_must_be_a_bool(rt):
    with pytest.raises(GenerationInputError, match="logprobs must be True or False, found 'yes'"):
        rt.generate([1], 3, logprobs="yes")


def test_cli_logprobs_in_the_json_object(exp, rt, capsys):
    from mamba_export.cli import main

    assert main(["generate", str(exp.dir), "--prompt-ids", "5,17,200", "--max-new-tokens", "6", "--json",
                 "--logprobs"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = rt.generate([5, 17, 200], 6, logprobs=True)
    assert out["tokens"] == want.tokens[0]
    np.testing.assert_allclose(out["logprobs"], want.logprobs[0], rtol=1e-12)
    assert main(["generate", str(exp.dir), "--prompt-ids", "5", "--max-new-tokens", "2", "--json"]) == 0
    assert "logprobs" not in json.loads(capsys.readouterr().out)
    assert main(["generate", str(exp.dir), "--prompt-ids", "5", "--logprobs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logprobs goes with --json" in err[0]


def test_every_turn_of_a_conversation_counts_the_whole_history_for_the_repetition_penalty(rt):
    """A third turn (and a snapshot of it, restored mid-turn) sees the first turn's tokens too: its sampler has seen
    exactly the tokens of start(whole history + prompt), and it picks the same tokens (found by a helper: the third
    turn had counted only the second turn and itself)."""
    strong = SamplingConfig(temperature=1.0, repetition_penalty=3.0, seed=5)
    first = rt.start(PROMPTS[0], 6, strong)
    first.run()
    second = first.follow(PROMPTS[2], 6)
    second.run()
    third = second.follow([1, 2], 8)
    history = PROMPTS[0] + first.tokens[0] + PROMPTS[2] + second.tokens[0]
    alone = rt.start([history + [1, 2]], 8, strong)
    assert set(np.flatnonzero(third.sampler.seen[0])) == set(history + [1, 2])
    np.testing.assert_array_equal(third.sampler.seen, alone.sampler.seen)
    third.step(), third.step()
    restored = rt.restore(third.snapshot())
    assert restored.history == [history]
    np.testing.assert_array_equal(restored.sampler.seen, third.sampler.seen)
    want = alone.run().tokens
    assert restored.run().tokens == want and third.run().tokens == want
    fourth = rt.restore(third.snapshot()).follow([3], 4)  # a turn after a restored one
    assert fourth.history == [history + [1, 2] + third.tokens[0]]


def test_a_snapshot_history_of_the_wrong_shape_is_refused(rt):
    gen = rt.start(PROMPTS[:2], 3)
    blob = gen.snapshot()
    with np.load(io.BytesIO(blob)) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["history"] == [[], []]
    for value, message in (([[]], "history must be a list of 2 token lists"),
                           ([[1], [999]], r"history must be a list of token ids in \[0, 256\)")):
        changed = _edited_snapshot(blob, meta=np.frombuffer(json.dumps({**meta, "history": value}).encode(),
                                                            dtype=np.uint8))
        with pytest.raises(SnapshotError, match=message):
            rt.restore(changed)
    del meta["history"]  # as written before the key existed
    old = _edited_snapshot(blob, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    assert rt.restore(old).history == [[], []]


# ---- --prompt-file ------------------------------------------------------------------------------------------------
def test_cli_prompt_file_and_stdin_give_the_prompts_bytes(exp, tmp_path, capsys, monkeypatch):
    """--prompt-file PATH (or - for standard input) is --prompt read from a file, its bytes as they are: the same
    tokens as --prompt for text, the very bytes for a byte-level model where they are not UTF-8, and a prompt longer
    than the 128 KiB a command-line argument can hold."""
    from mamba_export.cli import main

    def run(*args):
        assert main(["generate", str(exp.dir), "--max-new-tokens", "3", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    (tmp_path / "p.txt").write_text("héllo, world", encoding="utf-8")
    from_file, given = run("--prompt-file", str(tmp_path / "p.txt")), run("--prompt", "héllo, world")
    assert [from_file[k] for k in ("prompt_tokens", "tokens", "text")] == [given[k] for k in ("prompt_tokens",
                                                                                            "tokens", "text")]
    raw = b"And \xff\xfe then"
    (tmp_path / "raw.txt").write_bytes(raw)
    assert run("--prompt-file", str(tmp_path / "raw.txt"))["prompt_tokens"] == list(raw)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert run("--prompt-file", "-")["prompt_tokens"] == list(raw)
    long = bytes(np.random.default_rng(0).integers(32, 127, 140_000).astype(np.uint8))
    (tmp_path / "long.txt").write_bytes(long)
    assert run("--prompt-file", str(tmp_path / "long.txt"))["prompt_tokens"] == list(long)


def test_cli_prompt_file_errors_are_one_line(exp, tmp_path, capsys):
    from mamba_export.cli import main

    (tmp_path / "empty.txt").write_bytes(b"")
    for path, message in (("/nonexistent/p.txt", "--prompt-file: /nonexistent/p.txt: cannot read it (No such file"),
                          (str(tmp_path), "cannot read it (Is a directory)"),
                          (str(tmp_path / "empty.txt"), "--prompt-file is empty: give at least one token")):
        assert main(["generate", str(exp.dir), "--prompt-file", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(SystemExit):  # one prompt only
        main(["generate", str(exp.dir), "--prompt-file", path, "--prompt", "x"])
    assert "not allowed with argument" in capsys.readouterr().err
