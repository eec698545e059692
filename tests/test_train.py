"""mamba-export train: the "fast" scan against the reference, Mamba's initialisation, the schedule, a short run that
learns, checkpoints that load and resume exactly (byte-level, with a tokenizer, after Ctrl-C or SIGTERM), one-line
errors for bad input and damaged resume state, and stdout holding only the JSON result."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from mamba_export.cli import main
from mamba_export.config import MambaConfig
from mamba_export.errors import Interrupted, MambaExportError
from mamba_export.model import MambaLM
from mamba_export.ops import selective_scan_fast, selective_scan_ref
from mamba_export.training import loop
from mamba_export.training.init import init_mamba_weights
from mamba_export.training.loop import TrainOptions, lr_at, train
from mamba_export.training.presets import get_preset

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread only waits for the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def _scan_args(b, d, l, n, full: bool, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()

    A = (-torch.rand(d, n, generator=g, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    if not full:
        return [mk(b, d, l), mk(b, d, l).abs().detach().requires_grad_(), A, mk(b, n, l), mk(b, n, l)]
    return [mk(b, d, l), mk(b, d, l), A, mk(b, n, l), mk(b, n, l), mk(d), mk(b, d, l), mk(d), True, mk(b, d, n)]


@pytest.mark.parametrize("shape,full", [((2, 3, 9, 4), True), ((1, 2, 1, 3), True), ((2, 4, 6, 2), False)])
def test_fast_scan_equals_reference_with_gradients(shape, full):
    args = _scan_args(*shape, full=full)
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    outs = [f(*args) for f in (selective_scan_ref, selective_scan_fast)]
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(outs[0][0].shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(outs[0][1].shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), inputs) for y, h in outs]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-12, atol=1e-12)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-10)


def test_fast_backend_model_matches_reference_in_float32():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, d_state=8))
    init_mamba_weights(model)
    ids = torch.randint(0, 64, (2, 17))
    ref, _ = model(ids)
    model.set_backend("fast")
    fast, _ = model(ids)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_mamba_initialisation():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=4, vocab_size=256, d_state=16)
    model = MambaLM(cfg)
    init_mamba_weights(model)
    mixer = model.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(cfg.d_inner, 1))
    assert torch.equal(mixer.D, torch.ones(cfg.d_inner))
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    # Kaiming-uniform bound 1/sqrt(fan_in), divided by sqrt(n_layer).
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.9 * bound


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    p = get_preset("tiny")
    lrs = [lr_at(s, p) for s in range(p.steps)]
    assert lrs[0] == pytest.approx(p.lr / p.warmup)
    assert lrs[p.warmup - 1] == pytest.approx(p.lr)
    assert all(a >= b for a, b in zip(lrs[p.warmup - 1:], lrs[p.warmup:]))
    assert lr_at(p.steps, p) == pytest.approx(p.lr * p.min_lr_ratio)


def test_cli_run_writes_a_checkpoint_that_learns(tmp_path, text_file, capsys):
    out = tmp_path / "ckpt"
    rc = main(["train", "--data", str(text_file), "--preset", "tiny", "-o", str(out), "--steps", "30",
               "--no-progress"])
    assert rc == 0
    assert json.loads((out / "byte_vocab.json").read_text()) == {"type": "bytes", "vocab_size": 256}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert sum(r["loss"] for r in log[-5:]) < 0.75 * sum(r["loss"] for r in log[:5])
    evals = [r["heldout_bpb"] for r in log if "heldout_bpb" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps_done"] == 30 and 0 < summary["final_heldout_bpb"] < 8
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps_done"] == 30


def test_saved_checkpoint_gives_the_trained_models_logits(tmp_path, text_file):
    out = tmp_path / "ckpt"
    model, _ = train(TrainOptions(data=str(text_file), out=str(out), preset="tiny", steps=6, device="cpu",
                                  progress=False))
    loaded = load_checkpoint(out, backend="fast")
    ids = torch.tensor([list(TEXT[:50].encode())])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_resume_continues_exactly(tmp_path, text_file):
    def opts(out, **kw):
        return TrainOptions(data=str(text_file), out=str(tmp_path / out), steps=8, progress=False, **kw)

    whole, _ = train(opts("whole", preset="tiny"))
    train(opts("split", preset="tiny", until=3))
    assert json.loads((tmp_path / "split" / "training.json").read_text())["steps_done"] == 3
    resumed, _ = train(opts("split", resume=True))
    logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("whole", "split")]
    losses = [[json.loads(line)["loss"] for line in log] for log in logs]
    assert len(losses[1]) == 8 and losses[1] == losses[0]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_keeps_the_runs_backend_and_device(tmp_path, text_file):
    """A run started with --backend reference goes on with it when --resume names none (and with the one named)."""
    def opts(**kw):
        return TrainOptions(data=str(text_file), out=str(tmp_path / "run"), steps=4, progress=False, **kw)

    train(opts(preset="tiny", until=2, backend="reference", device="cpu"))
    _, summary = train(opts(resume=True, until=3))
    assert summary["backend"] == "reference" and summary["device"] == "cpu"
    _, summary = train(opts(resume=True, backend="fast"))
    assert summary["backend"] == "fast"


def _make_tokenizer(path: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on TEXT, saved at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"],
                                                        show_progress=False))
    tok.save(str(path))
    return tok


def test_tokenizer_based_training(tmp_path, text_file):
    tok_path = tmp_path / "tokenizer.json"
    tok = _make_tokenizer(tok_path)
    out = tmp_path / "ckpt"
    model, summary = train(TrainOptions(data=str(text_file), out=str(out), preset="tiny", steps=4, progress=False,
                                        tokenizer=str(tok_path)))
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= tok.get_vocab_size()
    assert (out / "tokenizer.json").read_text() == tok_path.read_text()
    assert not (out / "byte_vocab.json").exists()
    assert 0 < summary["final_heldout_bpb"] < 20


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(tmp_path, text_file, capsys):
    out = str(tmp_path / "out")
    base = ["train", "--no-progress", "-o", out]
    assert "not found" in _error_line(capsys, base + ["--data", str(tmp_path / "nope.txt"), "--preset", "tiny"])
    assert "is a directory, not a training text file" in _error_line(capsys, base + ["--data", str(tmp_path),
                                                                                     "--preset", "tiny"])
    assert "unknown preset 'huge'" in _error_line(capsys, base + ["--data", str(text_file), "--preset", "huge"])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    assert "empty" in _error_line(capsys, base + ["--data", str(empty), "--preset", "tiny"])
    short = tmp_path / "short.txt"
    short.write_text("only a few words\n" * 5)
    assert "too short" in _error_line(capsys, base + ["--data", str(short), "--preset", "tiny"])
    assert "nothing to resume" in _error_line(capsys, base + ["--data", str(text_file), "--resume"])
    assert "--preset is required" in _error_line(capsys, base + ["--data", str(text_file)])
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("not json")
    assert "not a tokenizers tokenizer.json" in _error_line(
        capsys, base + ["--data", str(text_file), "--preset", "tiny", "--tokenizer", str(bad_tok)])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "is a file" in _error_line(capsys, ["train", "--data", str(text_file), "--preset", "tiny", "--force",
                                                "-o", str(a_file)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "out" / "model.safetensors").write_text("")  # what --force may replace: a checkpoint directory
    assert "--force" in _error_line(capsys, base + ["--data", str(text_file), "--preset", "tiny"])
    assert "unknown backend" in _error_line(
        capsys, base + ["--data", str(text_file), "--preset", "tiny", "--force", "--backend", "magic", "--steps", "1"])
    assert "--until 50 is past the run's last step (10" in _error_line(
        capsys, base + ["--data", str(text_file), "--preset", "tiny", "--force", "--steps", "10", "--until", "50"])


@pytest.mark.parametrize("case", ["not a checkpoint", "holds the data", "the current directory", "unwritable"])
def test_output_checks_come_before_training_and_protect_files(tmp_path, text_file, capsys, monkeypatch, case):
    """--force replaces a checkpoint directory only: not a directory of other files, not one holding the training
    text, not the current directory; an output that cannot be written fails before training. One line each, every
    file left in place."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_text("")
    data = text_file
    if case == "not a checkpoint":
        (run / "config.json").unlink()
        (run / "notes.txt").write_text("precious")
        out, expect = run, "is not a checkpoint directory"
    elif case == "holds the data":
        data = run / "text.txt"
        data.write_text(text_file.read_text())
        out, expect = run, "contains --data"
    elif case == "the current directory":
        monkeypatch.chdir(run)
        out, expect = ".", "is the current directory"
    else:
        out, expect = "/proc/mamba-export-test/run", "cannot write there"
    before = sorted((p.name, p.read_bytes()) for p in run.iterdir())

    def too_late(*args, **kwargs):
        raise AssertionError("the text was read: the output was checked after the work began")

    monkeypatch.setattr(loop, "load_corpus", too_late)
    assert expect in _error_line(capsys, ["train", "--data", str(data), "--preset", "tiny", "--force", "-o", str(out),
                                          "--no-progress"])
    assert sorted((p.name, p.read_bytes()) for p in run.iterdir()) == before


def test_resume_refuses_a_different_text(tmp_path, text_file, capsys):
    out = str(tmp_path / "ckpt")
    assert main(["train", "--data", str(text_file), "--preset", "tiny", "-o", out, "--steps", "4", "--until", "2",
                 "--no-progress"]) == 0
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper())
    err = _error_line(capsys, ["train", "--data", str(other), "--resume", "-o", out, "--no-progress"])
    assert "not the text this run was trained on" in err


def test_shipped_model_is_a_trained_byte_model():
    """models/kjv-byte loads, is byte-level, was trained on the shipped text, and predicts its held-out end far better
    than chance (8 bits/byte): 1.553 bits/byte on these 4,096 bytes when it was shipped (fp32, CPU)."""
    from pathlib import Path

    from mamba_export.training.data import load_corpus
    from mamba_export.training.loop import evaluate_bits

    root = Path(__file__).resolve().parents[1]
    model = load_checkpoint(root / "models" / "kjv-byte", backend="fast")
    assert json.loads((root / "models" / "kjv-byte" / "byte_vocab.json").read_text())["type"] == "bytes"
    summary = json.loads((root / "models" / "kjv-byte" / "training.json").read_text())
    corpus = load_corpus(root / "data" / "kjv.txt", 0.05, 129)
    assert corpus.sha256 == summary["data"]["sha256"]
    bits, scored = evaluate_bits(model, corpus.heldout[:4096], 4, 128)
    assert bits / scored < 1.65


def test_cuda_graph_option_errors_and_summary(tmp_path, text_file, capsys):
    """--cuda-graph on without CUDA is a one-line error; on the CPU the steps run eagerly and the summary says so."""
    err = _error_line(capsys, ["train", "--data", str(text_file), "--preset", "tiny", "-o", str(tmp_path / "a"),
                               "--device", "cpu", "--cuda-graph", "on", "--no-progress"])
    assert "--cuda-graph on needs a CUDA device" in err
    assert not (tmp_path / "a").exists()
    _, summary = train(TrainOptions(data=str(text_file), out=str(tmp_path / "b"), preset="tiny", steps=2,
                                    device="cpu", progress=False))
    assert summary["cuda_graph"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "fast"])
def test_cuda_graph_steps_match_eager_steps(tmp_path, text_file, backend):
    """On CUDA, 12 steps of the tiny preset as CUDA graph replays (captured after 3 eager steps) give the losses and
    weights of 12 eager steps from the same seed; a graphed run resumes on the CPU (AdamW leaves capturable mode) and
    on CUDA with a graph again."""
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        model, summary = train(TrainOptions(data=str(text_file), out=str(out), preset="tiny", steps=12,
                                            backend=backend, device="cuda", cuda_graph=mode, progress=False))
        losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[mode] = (summary, losses, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    assert runs["on"][0]["cuda_graph"] is True and runs["off"][0]["cuda_graph"] is False
    (_, on, w_on), (_, off, w_off) = runs["on"], runs["off"]
    assert len(on) == len(off) == 12
    assert max(abs(a - b) / b for a, b in zip(on, off)) < 1e-3, (on, off)
    assert on[-1] < on[0] - 0.5  # it learns
    for k in w_off:
        assert torch.allclose(w_on[k], w_off[k], rtol=1e-3, atol=2e-3), k
    # resume a graphed run: on the CPU (eager) and on CUDA (graphed again)
    half = tmp_path / "half"
    train(TrainOptions(data=str(text_file), out=str(half), preset="tiny", steps=12, until=6, backend=backend,
                       device="cuda", cuda_graph="on", progress=False))
    for device, mode in (("cpu", "off"), ("cuda", "on")):
        cont = tmp_path / f"cont_{device}"
        shutil.copytree(half, cont)
        _, summary = train(TrainOptions(data=str(text_file), out=str(cont), resume=True, device=device,
                                        backend=backend if device == "cuda" else "fast", cuda_graph=mode,
                                        progress=False))
        assert summary["steps_done"] == 12 and summary["cuda_graph"] is (device == "cuda")
        assert summary["final_heldout_bpb"] < 8


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_run(dir_a: Path, dir_b: Path, model_a=None, model_b=None) -> None:
    """Two runs' logs have the same losses and their weights are bit-identical."""
    losses = [[json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()]
              for d in (dir_a, dir_b)]
    assert losses[0] == losses[1]
    wa = _weights(model_a or load_checkpoint(dir_a, backend="fast"))
    wb = _weights(model_b or load_checkpoint(dir_b, backend="fast"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_tokenizer_run_resumes_exactly_with_its_own_tokenizer(tmp_path, text_file):
    """A --tokenizer run resumed without --tokenizer (the checkpoint's copy is used), or with --tokenizer naming that
    copy or a file of the same content, gives the weights of an uninterrupted run, and keeps tokenizer.json (no
    byte_vocab.json) and its SHA-256 in the state and the summary."""
    import hashlib

    tok_path = tmp_path / "tok.json"
    _make_tokenizer(tok_path)
    sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()

    def opts(out, **kw):
        return TrainOptions(data=str(text_file), out=str(tmp_path / out), steps=8, progress=False, **kw)

    whole, summary = train(opts("whole", preset="tiny", tokenizer=str(tok_path)))
    assert summary["data"]["tokenizer"] == "tokenizer.json" and summary["data"]["tokenizer_sha256"] == sha
    train(opts("split", preset="tiny", tokenizer=str(tok_path), until=3))
    split = tmp_path / "split"
    assert torch.load(split / "train_state.pt", weights_only=True)["tokenizer_sha256"] == sha
    raw = torch.load(split / "train_state.pt", weights_only=True)
    del raw["tokenizer_sha256"]  # as written before the key existed: the checkpoint's tokenizer.json is the run's
    torch.save(raw, split / "train_state.pt")
    train(opts("split", resume=True, until=5))  # no --tokenizer: the stored one
    train(opts("split", resume=True, until=6, tokenizer=str(split / "tokenizer.json")))  # the checkpoint's own copy
    resumed, summary = train(opts("split", resume=True, tokenizer=str(tok_path)))  # the original file
    assert summary["steps_done"] == 8 and summary["data"]["tokenizer_sha256"] == sha
    assert (split / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert not (split / "byte_vocab.json").exists()
    _assert_same_run(tmp_path / "whole", split, whole, resumed)


def test_resume_refuses_a_tokenizer_that_does_not_fit(tmp_path, text_file, capsys):
    """--resume --tokenizer: refused for a byte-level run, for a different tokenizer, and when the checkpoint's own
    copy was changed; a byte-level run stays byte-level."""
    tok_path, other = tmp_path / "tok.json", tmp_path / "other.json"
    _make_tokenizer(tok_path)
    _make_tokenizer(other, vocab_size=60)  # fewer merges (TEXT gives 78 tokens at most)
    base = ["--data", str(text_file), "--steps", "4", "--no-progress"]
    byte_run, tok_run = str(tmp_path / "bytes"), str(tmp_path / "tok")
    assert main(["train", *base, "--preset", "tiny", "-o", byte_run, "--until", "2"]) == 0
    assert main(["train", *base, "--preset", "tiny", "-o", tok_run, "--until", "2", "--tokenizer", str(tok_path)]) == 0
    capsys.readouterr()
    err = _error_line(capsys, ["train", *base, "-o", byte_run, "--resume", "--tokenizer", str(tok_path)])
    assert "is byte-level" in err and "without --tokenizer" in err
    err = _error_line(capsys, ["train", *base, "-o", tok_run, "--resume", "--tokenizer", str(other)])
    assert "not the tokenizer this run was trained with" in err
    stored = tmp_path / "tok" / "tokenizer.json"
    stored.write_bytes(other.read_bytes())
    assert "not the tokenizer this run was trained with" in _error_line(capsys, ["train", *base, "-o", tok_run,
                                                                                  "--resume"])
    stored.unlink()
    assert "tokenizer.json: missing" in _error_line(capsys, ["train", *base, "-o", tok_run, "--resume"])
    assert main(["train", *base, "-o", byte_run, "--resume"]) == 0
    assert (tmp_path / "bytes" / "byte_vocab.json").is_file() and not (tmp_path / "bytes" / "tokenizer.json").exists()


def _damage(ckpt: Path, case: str) -> None:
    state, log = ckpt / "train_state.pt", ckpt / "train_log.jsonl"
    if case == "truncated state":
        state.write_bytes(state.read_bytes()[:1000])
    elif case == "state not a dict":
        torch.save([1, 2, 3], state)
    elif case == "state missing a key":
        raw = torch.load(state, weights_only=True)
        del raw["optimizer"]
        torch.save(raw, state)
    elif case == "no log":
        log.unlink()
    elif case == "garbage log line":
        with open(log, "a") as fh:
            fh.write("garbage\n")
    elif case == "log too short":
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    elif case == "foreign optimiser state":
        raw = torch.load(state, weights_only=True)
        raw["optimizer"]["param_groups"] = raw["optimizer"]["param_groups"][:1]
        torch.save(raw, state)


@pytest.mark.parametrize("case,expect", [
    ("truncated state", "train_state.pt: cannot be read as a training state"),
    ("state not a dict", "train_state.pt: not a training state"),
    ("state missing a key", "train_state.pt: not a complete training state (missing optimizer)"),
    ("no log", "train_log.jsonl: missing"),
    ("garbage log line", "train_log.jsonl: line 5 is not JSON"),
    ("log too short", "train_log.jsonl: holds 3 steps, but train_state.pt is at step 4"),
    ("foreign optimiser state", "train_state.pt: does not fit the checkpoint's model"),
])
def test_damaged_resume_state_is_a_one_line_error(tmp_path, text_file, capsys, case, expect):
    out = tmp_path / "ckpt"
    assert main(["train", "--data", str(text_file), "--preset", "tiny", "-o", str(out), "--steps", "6", "--until",
                 "4", "--no-progress"]) == 0
    _damage(out, case)
    assert expect in _error_line(capsys, ["train", "--data", str(text_file), "-o", str(out), "--resume",
                                          "--no-progress"])


def test_stdout_is_only_the_json_result(tmp_path, text_file, capsys):
    """Evaluation lines go to stderr (with and without --no-progress); stdout parses as one JSON object."""
    for i, extra in enumerate((["--no-progress"], [])):
        assert main(["train", "--data", str(text_file), "--preset", "tiny", "-o", str(tmp_path / f"r{i}"),
                     "--steps", "10", *extra]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["steps_done"] == 10
        assert "step 10: held-out" in captured.err


def test_evaluation_can_be_cut_short():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, d_state=8)).train()
    ids = torch.randint(0, 64, (200,))
    assert loop.evaluate_bits(model, ids, 2, 16, should_stop=lambda: True) is None
    assert model.training
    assert loop.evaluate_bits(model, ids, 2, 16, should_stop=lambda: False) == loop.evaluate_bits(model, ids, 2, 16)


def _train_cmd(text_file, out, *extra) -> list[str]:
    return [sys.executable, "-m", "mamba_export.cli", "train", "--data", str(text_file), "-o", str(out),
            "--no-progress", "--threads", "1", "--device", "cpu", *extra]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, text_file, capsys, sig, status):
    """A run sent SIGINT (Ctrl-C) or SIGTERM after its step-10 evaluation line finishes the step it is in, saves,
    says how to continue on one stderr line and exits with 128 + the signal's number; resumed, it gives the weights
    of a run that was never stopped. (--steps is far beyond what the run can reach before the signal, so the step it
    stops at varies but the outcome does not.)"""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(text_file, out, "--preset", "tiny", "--steps", "100000"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("step 10: held-out"):
                break
        else:
            pytest.fail(f"no step-10 line; stderr: {''.join(seen)}")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stderr, stderr
    assert lines[0] == loop._StopRequest.STOPPING  # said at once, before the step ends
    lines = lines[1:]
    stopped = json.loads((out / "training.json").read_text())["steps_done"]
    assert stopped >= 10
    assert lines[0] == (f"mamba-export train: interrupted at step {stopped}; saved {out}; continue with: mamba-export "
                        f"train --data {text_file} -o {out} --resume")
    assert len((out / "train_log.jsonl").read_text().splitlines()) == stopped
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert main(["train", "--data", str(text_file), "-o", str(out), "--resume", "--until", str(stopped + 3),
                 "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_done"] == stopped + 3
    ref, _ = train(TrainOptions(data=str(text_file), out=str(tmp_path / "ref"), preset="tiny", steps=100000,
                                until=stopped + 3, progress=False, device="cpu"))
    _assert_same_run(tmp_path / "ref", out, model_a=ref)


def test_second_sigint_during_the_save_keeps_the_previous_checkpoint(tmp_path, text_file, monkeypatch):
    """In-process: SIGINT after step 12 (handlers are the run's own, so the test sees what a user would), then
    another one while the checkpoint of step 12 is being written: that save is abandoned, the periodic one of step
    10 stays, nothing temporary is left, and the caller's SIGINT handler is back."""
    from mamba_export import checkpoint

    real_step, real_write_dir = loop._train_step, checkpoint.write_dir
    calls = {"steps": 0, "saves": 0}

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["steps"] += 1
        if calls["steps"] == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    def write_dir(out, build, what, error):
        calls["saves"] += 1
        if calls["saves"] == 1:
            return real_write_dir(out, build, what, error)

        def build_then_signal(tmp):
            build(tmp)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the handler raises KeyboardInterrupt here (or before)
            raise AssertionError("the second SIGINT did not stop the save")

        return real_write_dir(out, build_then_signal, what, error)

    monkeypatch.setattr(loop, "_train_step", step)
    monkeypatch.setattr(checkpoint, "write_dir", write_dir)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted again before the checkpoint of step 12 was saved") as info:
        train(TrainOptions(data=str(text_file), out=str(out), preset="tiny", steps=100, device="cpu", progress=False))
    assert info.value.exit_status == 130 and calls["saves"] == 2
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((out / "training.json").read_text())["steps_done"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "text.txt"]  # no temporary directory left
    load_checkpoint(out, backend="fast")


def _sigint_after_step(monkeypatch, k: int):
    """Make the process send itself SIGINT once training step ``k`` has run; returns the real step function."""
    real_step = loop._train_step
    calls = {"steps": 0}

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["steps"] += 1
        if calls["steps"] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "_train_step", step)
    return real_step


def test_single_sigint_in_process_raises_interrupted_and_restores_handlers(tmp_path, text_file, monkeypatch):
    """The Python API: the first SIGINT ends train() with Interrupted (exit_status 130) after a save at the step it
    was in; the handlers of SIGINT and SIGTERM are the caller's again afterwards; from a thread other than the main
    one, train() installs no handler and runs as usual."""
    real_step = _sigint_after_step(monkeypatch, 3)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted at step 3; saved") as info:
        train(TrainOptions(data=str(text_file), out=str(out), preset="tiny", steps=8, device="cpu", progress=False))
    assert info.value.exit_status == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert json.loads((out / "training.json").read_text())["steps_done"] == 3

    monkeypatch.setattr(loop, "_train_step", real_step)
    result = {}

    def in_thread():
        try:
            result["summary"] = train(TrainOptions(data=str(text_file), out=str(tmp_path / "t"), preset="tiny",
                                                   steps=2, device="cpu", progress=False))[1]
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert "error" not in result and result["summary"]["steps_done"] == 2


def test_interrupted_in_the_last_step_resumes_to_the_final_evaluation(tmp_path, text_file, monkeypatch):
    """A signal in the run's last step saves it without the final held-out evaluation; --resume then runs only that
    evaluation (the weights unchanged, the same number as an uninterrupted run), not "nothing to do"."""
    def opts(out, **kw):
        return TrainOptions(data=str(text_file), out=str(tmp_path / out), steps=4, device="cpu", progress=False, **kw)

    whole, whole_summary = train(opts("whole", preset="tiny"))
    real_step = _sigint_after_step(monkeypatch, 4)
    with pytest.raises(Interrupted, match="the run's last; saved .* without the final held-out evaluation"):
        train(opts("cut", preset="tiny"))
    monkeypatch.setattr(loop, "_train_step", real_step)
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["final_heldout_bpb"] is None
    resumed, summary = train(opts("cut", resume=True))
    assert summary["final_heldout_bpb"] == whole_summary["final_heldout_bpb"] is not None
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(MambaExportError, match="nothing to do"):
        train(opts("cut", resume=True))


def test_bits_per_byte_divides_by_the_bytes_of_the_tokens_scored(tmp_path):
    """A tokenizer run's held-out text that is ASCII first and Greek after (2 bytes a letter): a periodic evaluation
    of the first tokens divides its bits by the bytes those tokens cover (as decoding them counts), not by the whole
    held-out text's average bytes a token, which would be far off here; the final one by the bytes of all it
    scored."""
    import dataclasses

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mamba_export.training.data import load_corpus
    from mamba_export.training.loop import build_model, evaluate_bits, heldout_bpb
    from mamba_export.training.presets import get_preset

    greek = "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν, καὶ θεὸς ἦν ὁ λόγος.\n"
    text = TEXT * 4 + TEXT[:2000] + greek * 40
    data = tmp_path / "mixed.txt"
    data.write_text(text, encoding="utf-8")
    tok_path = tmp_path / "tokenizer.json"
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tok_path))
    p = dataclasses.replace(get_preset("tiny"), eval_fraction=0.25, eval_tokens=256)
    corpus = load_corpus(data, p.eval_fraction, p.seq_len + 1, str(tok_path))
    assert corpus.heldout_bytes == sum(len(tok.decode([i]).encode("utf-8")) for i in corpus.heldout.tolist())
    torch.manual_seed(0)
    model = build_model(corpus.vocab_size, p, "reference")

    def by_decoding(ids, streams) -> float:  # bits over the UTF-8 bytes of the scored tokens, decoded
        bits, _ = evaluate_bits(model, ids, streams, p.seq_len)
        per = len(ids) // streams
        scored = [i for s in range(streams) for i in ids[s * per + 1:(s + 1) * per].tolist()]
        return bits / len(tok.decode(scored).encode("utf-8"))

    first = corpus.heldout[:p.eval_tokens]
    periodic = heldout_bpb(model, corpus, p, p.eval_tokens)
    assert periodic == pytest.approx(by_decoding(first, min(p.batch_size, len(first) // (p.seq_len + 1))), rel=2e-3)
    bits, scored_tokens = evaluate_bits(model, first, 4, p.seq_len)
    averaged = bits / (scored_tokens * corpus.heldout_bytes / len(corpus.heldout))  # the old, averaged divisor
    assert abs(averaged / periodic - 1) > 0.05
    final = heldout_bpb(model, corpus, p)
    assert final == pytest.approx(by_decoding(corpus.heldout, p.batch_size), rel=2e-3)


def test_wall_time_includes_the_final_evaluation(tmp_path, text_file, monkeypatch):
    """training.json's wall_s counts the final held-out evaluation (made to take 0.6 s here) as well as the steps."""
    import time

    from mamba_export.training import loop

    real = loop.heldout_bpb

    def slow_final(model, corpus, p, max_tokens=None, should_stop=None):
        if max_tokens is None:
            time.sleep(0.6)
        return real(model, corpus, p, max_tokens, should_stop)

    monkeypatch.setattr(loop, "heldout_bpb", slow_final)
    _, summary = train(TrainOptions(data=str(text_file), out=str(tmp_path / "run"), preset="tiny", steps=2,
                                    progress=False))
    assert summary["final_heldout_bpb"] is not None and summary["wall_s"] >= 0.6
