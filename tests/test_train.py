"""mamba-export train: the "fast" scan against the reference, Mamba's initialisation, the schedule, a short run that
learns, checkpoints that load and resume exactly, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mamba_export.checkpoint import load_checkpoint
from mamba_export.cli import main
from mamba_export.config import MambaConfig
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


def test_tokenizer_based_training(tmp_path, text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
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
