"""The C++ runtime (runtime/cpp): mamba_generate, built by tools/build_cpp_runtime.sh, runs tiny exports and must
reproduce the reference model (greedy tokens, and the logits of prefill + single steps against the full forward) and
the Python runtime; every user error is one line and exit code 2, never a crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import make_hf_model, rel_err, save_state_spaces

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 7, 3]
N_NEW = 12
FLOAT32_TOL = 1e-4  # relative error of float32 logits against the float32 reference (README test policy)
# The three exports the tests share: float32 with the custom-op library; without it, with model_last.onnx; float16
# with a byte-level vocabulary (vocabulary 256).
MAIN = dict(name="nondefault")
NO_LIBRARY = dict(name="noconvbias", library=False, last_logits=True)
BYTES_F16 = dict(name="tiny", byte_vocab=True, dtype="float16")
FLOAT16_TOL = 5e-3  # float16 weights and activations against the float32 reference (seen: 5e-4)


@pytest.fixture(scope="module")
def binary() -> Path:
    """mamba_generate, (re)built by the build script: a no-op when nothing changed."""
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "tools/build_cpp_runtime.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), proc.stdout
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """export(name, library=True, byte_vocab=False, **export_options) -> (export dir, float32 reference MambaLM),
    each made once per module."""
    from mamba_export.checkpoint import load_checkpoint
    from mamba_export.export.api import export_checkpoint

    root = tmp_path_factory.mktemp("cpp_runtime")
    made = {}

    def get(name: str, library: bool = True, byte_vocab: bool = False, **options):
        key = "-".join([name, "lib" if library else "nolib", "bytes" if byte_vocab else "ids",
                        *(f"{k}={v}" for k, v in sorted(options.items()))])
        if key not in made:
            ckpt = save_state_spaces(make_hf_model(name, seed=1), root / f"ckpt-{key}")
            if byte_vocab:
                (ckpt / "byte_vocab.json").write_text(json.dumps({"type": "bytes", "vocab_size": 256}))
            out = export_checkpoint(ckpt, root / f"export-{key}", with_library=library, **options)
            made[key] = out, load_checkpoint(ckpt)
        return made[key]

    return get


def program_env() -> dict[str, str] | None:
    """The C++ programs' environment: under tools/sanitize.sh they check for leaks, which the Python process running
    the tests does not (its own leaks at exit are CPython's and torch's)."""
    options = os.environ.get("MAMBA_SANITIZE_PROGRAM_ASAN_OPTIONS")
    return None if options is None else dict(os.environ, ASAN_OPTIONS=options)


def run(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, encoding="utf-8", timeout=120,
                          env=program_env())


def generate(binary: Path, export_dir: Path, *args) -> dict[str, str]:
    """Run mamba_generate, expect success, return its 'key: value' lines."""
    proc = run(binary, export_dir, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


def ids(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def quoted(data: bytes) -> str:
    """What mamba_generate prints for text: valid UTF-8 as is; quotes, backslashes, control bytes and bytes that are
    not valid UTF-8 escaped."""
    out = []
    for ch in data.decode("utf-8", errors="surrogateescape"):
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that is not part of valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    return model.generate_greedy(torch.tensor([prompt]), n)[0].tolist()


@pytest.mark.parametrize("flags", [[], ["--no-custom-ops"], ["--ort-config", "session.disable_prepacking=1"]],
                         ids=["custom-ops", "no-custom-ops", "ort-config"])
def test_greedy_tokens_and_logits_match_reference(binary, export, tmp_path, flags):
    """Prefill + decode steps in C++ give the reference's greedy tokens and its full-forward logits."""
    out, model = export(**MAIN)
    dump = tmp_path / "logits.f32"
    custom_ops = "--no-custom-ops" not in flags
    res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW, "--greedy",
                   "--dump-logits", dump, *flags)
    tokens = ids(res["tokens"])
    assert tokens == reference_greedy(model, PROMPT, N_NEW)
    assert ("custom ops: off" in res["decoding"]) == (not custom_ops)
    assert res["stopped"] == "max new tokens"
    assert res["prefill"].endswith("(model.onnx, logits float32)")
    assert float(res["decode"].split(", ")[1].split()[0]) > 0  # ms/token

    got = np.fromfile(dump, dtype=np.float32).reshape(N_NEW, model.config.vocab_size)
    with torch.no_grad():
        full, _ = model(torch.tensor([PROMPT + tokens[:-1]]))
    want = full[0, len(PROMPT) - 1:]
    assert rel_err(torch.from_numpy(got), want) < FLOAT32_TOL


def test_without_library_matches_reference(binary, export):
    """An export without the custom-op library (other sizes: no conv bias, d_conv 2) runs with --no-custom-ops, and
    its model_last.onnx (last-position logits) does the prefill."""
    out, model = export(**NO_LIBRARY)
    res = generate(binary, out, "--prompt-ids", "1,2,3", "--max-new-tokens", 8, "--no-custom-ops")
    assert ids(res["tokens"]) == reference_greedy(model, [1, 2, 3], 8)
    assert res["prefill"].endswith("(model_last.onnx, logits float32)")


def test_float16_export(binary, export, tmp_path):
    """float16 logits are converted: same tokens as the Python runtime, logits near the float32 reference."""
    from mamba_runtime import MambaRuntime

    out, model = export(**BYTES_F16)
    dump = tmp_path / "logits.f32"
    res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW,
                   "--dump-logits", dump)
    tokens = ids(res["tokens"])
    assert res["prefill"].endswith("(model.onnx, logits float16)")
    assert tokens == list(MambaRuntime(out, provider="cpu", custom_ops="require").generate(PROMPT, N_NEW).tokens[0])
    got = np.fromfile(dump, dtype=np.float32).reshape(N_NEW, model.config.vocab_size)
    with torch.no_grad():
        full, _ = model(torch.tensor([PROMPT + tokens[:-1]]))
    assert rel_err(torch.from_numpy(got), full[0, len(PROMPT) - 1:]) < FLOAT16_TOL


def test_prefill_in_chunks(binary, export, tmp_path):
    """--prefill-chunk 2 runs the 5-token prompt in three runs, each continuing the state: same tokens and logits."""
    out, _ = export(**MAIN)
    prompt = ",".join(map(str, PROMPT))
    one = generate(binary, out, "--prompt-ids", prompt, "--max-new-tokens", 3, "--dump-logits", tmp_path / "a")
    chunked = generate(binary, out, "--prompt-ids", prompt, "--max-new-tokens", 3, "--prefill-chunk", 2,
                       "--dump-logits", tmp_path / "b")
    assert chunked["tokens"] == one["tokens"]
    a, b = (np.fromfile(tmp_path / name, dtype=np.float32) for name in ("a", "b"))
    assert rel_err(torch.from_numpy(b), torch.from_numpy(a)) < 1e-6


def test_matches_python_runtime(binary, export):
    from mamba_runtime import MambaRuntime

    out, _ = export(**MAIN)
    py = MambaRuntime(out, provider="cpu", custom_ops="require").generate(PROMPT, N_NEW).tokens[0]
    res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW)
    assert ids(res["tokens"]) == list(py)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_python_runtime(binary, export, penalty):
    """Greedy decoding with a repetition penalty (> 1 and < 1) gives the Python runtime's tokens, the prompt and the
    new tokens counting as seen; the tokens differ from those without the penalty, so the comparison tests it."""
    from mamba_runtime import MambaRuntime
    from mamba_runtime.sampling import SamplingConfig

    out, _ = export(**MAIN)
    rt = MambaRuntime(out, provider="cpu", custom_ops="require")
    py = rt.generate(PROMPT, N_NEW, SamplingConfig(repetition_penalty=penalty)).tokens[0]
    args = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW]
    res = generate(binary, out, *args, "--repetition-penalty", penalty)
    assert ids(res["tokens"]) == list(py)
    assert res["decoding"].startswith(f"greedy (repetition penalty {penalty:f}); ")
    plain = generate(binary, out, *args)
    assert ids(plain["tokens"]) != list(py)
    assert plain["decoding"].startswith("greedy; ")
    assert list(rt.generate(PROMPT, N_NEW).tokens[0]) == ids(plain["tokens"])


def test_logprobs_match_the_python_runtime_and_the_dumped_logits(binary, export, tmp_path):
    """--logprobs prints each new token's log-probability: greedy, the Python runtime's logprobs; sampled with a
    repetition penalty, the log softmax of the raw logits --dump-logits wrote (not of the penalised ones)."""
    from mamba_runtime import MambaRuntime

    out, _ = export(**MAIN)
    prompt = ",".join(map(str, PROMPT))
    res = generate(binary, out, "--prompt-ids", prompt, "--max-new-tokens", N_NEW, "--logprobs")
    py = MambaRuntime(out, provider="cpu", custom_ops="require").generate(PROMPT, N_NEW, logprobs=True)
    assert ids(res["tokens"]) == py.tokens[0]
    np.testing.assert_allclose([float(v) for v in res["logprobs"].split(",")], py.logprobs[0], atol=1e-6)
    res = generate(binary, out, "--prompt-ids", prompt, "--max-new-tokens", N_NEW, "--sample", "--seed", 4,
                   "--repetition-penalty", 1.5, "--logprobs", "--dump-logits", tmp_path / "l.f32")
    logits = np.fromfile(tmp_path / "l.f32", dtype=np.float32).reshape(N_NEW, -1).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    want = log_softmax[np.arange(N_NEW), ids(res["tokens"])]
    np.testing.assert_allclose([float(v) for v in res["logprobs"].split(",")], want, rtol=1e-7, atol=1e-9)
    assert (want < -1e-3).any()
    assert "logprobs" not in generate(binary, out, "--prompt-ids", prompt, "--max-new-tokens", 2)


def test_stop_token_ends_generation(binary, export):
    out, model = export(**MAIN)
    greedy = reference_greedy(model, PROMPT, N_NEW)
    stop = greedy[3]
    res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW,
                   "--stop-ids", f"{stop},0")
    assert ids(res["tokens"]) == greedy[: greedy.index(stop) + 1]
    assert res["stopped"] == "stop token"


def test_stop_token_is_not_in_the_text(binary, export):
    """Byte-level text: the stop token ends the generation and is left out of the text line, as the Python runtime
    leaves it out of its text (the ids keep it in both)."""
    from mamba_runtime import MambaRuntime

    out, _ = export(**BYTES_F16)
    rt = MambaRuntime(out, provider="cpu", custom_ops="require")
    greedy = list(rt.generate("ab", 8).tokens[0])
    stop = greedy[3]
    kept = greedy[: greedy.index(stop) + 1]
    res = generate(binary, out, "--prompt", "ab", "--max-new-tokens", 8, "--stop-ids", str(stop))
    assert ids(res["tokens"]) == kept and res["stopped"] == "stop token"
    assert res["text"] == quoted(bytes(kept[:-1]))
    assert list(rt.generate("ab", 8, stop_tokens=[stop]).tokens[0]) == kept


def _stop_string_in(data: bytes, new_last_byte: bool = False) -> tuple[bytes, int]:
    """Two bytes of ``data`` (no NUL: they go on the command line) whose first occurrence starts at i >= 1 and ends
    before the last byte, and i; with new_last_byte, their last byte occurs nowhere before them."""
    for i in range(1, len(data) - 2):
        stop = data[i:i + 2]
        if 0 not in stop and data.find(stop) == i and (not new_last_byte or data.find(stop[1:]) == i + 1):
            return stop, i
    pytest.fail(f"no usable stop string in {data!r}")


# byte-level export, 16 new tokens: greedy (its continuation repeats one byte after the first) and sampled
STOP_RUNS = {"greedy": ["--prompt", "hi!"], "sample": ["--prompt", "ab", "--sample", "--seed", 1]}


@pytest.mark.parametrize("decoding", list(STOP_RUNS))
def test_stop_string_ends_generation(binary, export, decoding):
    """--stop TEXT (repeatable) ends the generation right after the first place where its new bytes end with TEXT:
    the tokens are those of the run without --stop up to and including the match, the text line leaves the match
    out; a stop string that never occurs changes nothing."""
    out, _ = export(**BYTES_F16)
    args = [*STOP_RUNS[decoding], "--max-new-tokens", 16]
    full = ids(generate(binary, out, *args)["tokens"])
    stop, at = _stop_string_in(bytes(full))
    for others in ([], ["--stop", "never"]):
        res = generate(binary, out, *args, *others, "--stop", os.fsdecode(stop))  # fsdecode: the bytes as they are
        assert ids(res["tokens"]) == full[: at + 2]
        assert res["text"] == quoted(bytes(full[:at]))
        assert res["stopped"] == "stop string"
    assert b"never" not in bytes(full)
    res = generate(binary, out, *args, "--stop", "never")
    assert ids(res["tokens"]) == full and res["stopped"] == "max new tokens"
    assert res["text"] == quoted(bytes(full))


def test_stop_strings_match_the_python_runtime(binary, export):
    """The same stop strings end the same greedy run after the same token in both runtimes, with the same text (the
    Python runtime matches text, the C++ one byte sequences: the same for ASCII); both given at once, the one that
    starts first is cut, as Python cuts at the earliest match."""
    from mamba_runtime import MambaRuntime

    out, _ = export(**BYTES_F16)
    rt = MambaRuntime(out, provider="cpu", custom_ops="require")
    full = list(rt.generate("hi!", 16).tokens[0])
    assert max(full[:3]) < 0x80 and 0 not in full[:3]  # ASCII, so that text and bytes are the same match
    one, two = bytes(full[1:3]).decode(), bytes(full[0:3]).decode()
    for stops in ([one], [two], [one, two]):
        py = rt.generate("hi!", 16, stop_strings=stops)
        flags = [a for s in stops for a in ("--stop", s)]
        res = generate(binary, out, "--prompt", "hi!", "--max-new-tokens", 16, *flags)
        assert py.finish_reasons == ["stop"] and res["stopped"] == "stop string"
        assert ids(res["tokens"]) == py.tokens[0] == full[:3]
        assert res["text"] == quoted(py.texts[0].encode()) and py.texts[0] == ("" if two in stops else chr(full[0]))
    # a stop token that would complete a stop string ends the generation as a stop token in both
    py = rt.generate("hi!", 16, stop_tokens=[full[1]], stop_strings=[bytes(full[0:2]).decode()])
    res = generate(binary, out, "--prompt", "hi!", "--max-new-tokens", 16, "--stop", bytes(full[0:2]).decode(),
                   "--stop-ids", full[1])
    assert ids(res["tokens"]) == py.tokens[0] == full[:2] and res["stopped"] == "stop token"
    assert res["text"] == quoted(py.texts[0].encode()) == quoted(bytes(full[:1]))


def test_stop_token_that_ends_a_stop_string(binary, export):
    """A stop token that is the last byte of a stop string: a stop token is no text, so it ends the generation as a
    stop token, only it left out of the text, with or without the stop string, as in the Python runtime (without
    the stop token, the stop string ends it at the same token and leaves itself out)."""
    out, _ = export(**BYTES_F16)
    args = [*STOP_RUNS["sample"], "--max-new-tokens", 16]
    full = ids(generate(binary, out, *args)["tokens"])
    stop, at = _stop_string_in(bytes(full), new_last_byte=True)
    for extra in (["--stop", os.fsdecode(stop)], []):
        res = generate(binary, out, *args, *extra, "--stop-ids", stop[-1])
        assert ids(res["tokens"]) == full[: at + 2] and res["stopped"] == "stop token"
        assert res["text"] == quoted(bytes(full[:at + 1]))
    res = generate(binary, out, *args, "--stop", os.fsdecode(stop))
    assert ids(res["tokens"]) == full[: at + 2] and res["stopped"] == "stop string"
    assert res["text"] == quoted(bytes(full[:at]))


@pytest.mark.parametrize("decoding", [[], ["--sample", "--seed", 1]], ids=["greedy", "sample"])
def test_stop_string_across_the_prompt_does_not_match(binary, export, decoding):
    """The prompt's last byte followed by the first new byte: only the new bytes count, so the generation ends at
    the stop string's first occurrence among them (greedy: "bb" after the prompt "ab", whose continuation repeats
    "b": after the second new byte, not the first), or runs to --max-new-tokens when there is none (sample)."""
    out, _ = export(**BYTES_F16)
    args = ["--prompt", "ab", *decoding, "--max-new-tokens", 16]
    full = ids(generate(binary, out, *args)["tokens"])
    stop = b"b" + bytes(full[:1])
    res = generate(binary, out, *args, "--stop", os.fsdecode(stop))
    at = bytes(full).find(stop)
    if at < 0:
        assert ids(res["tokens"]) == full and res["stopped"] == "max new tokens"
    else:
        assert ids(res["tokens"]) == full[: at + 2] and res["stopped"] == "stop string"


def test_sampling_is_seeded_and_respects_top_k(binary, export, tmp_path):
    out, _ = export(**MAIN)

    def sample(seed: int, dump: Path) -> list[int]:
        res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW,
                       "--sample", "--temperature", 2.0, "--top-k", 5, "--seed", seed, "--dump-logits", dump)
        assert res["decoding"].startswith("sample (temperature 2")
        return ids(res["tokens"])

    first = sample(7, tmp_path / "a.f32")
    assert sample(7, tmp_path / "b.f32") == first
    assert sample(8, tmp_path / "c.f32") != first
    logits = np.fromfile(tmp_path / "a.f32", dtype=np.float32).reshape(N_NEW, -1)
    for row, token in zip(logits, first):
        assert token in np.argsort(-row)[:5]


def nucleus(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The tokens top-p sampling may pick: the top_k most likely (all when 0), then the fewest most likely of those
    whose probability (softmax of logits / temperature, renormalized over them) reaches top_p."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    if top_k:
        order = order[:top_k]
    x = logits[order].astype(np.float64) / temperature
    p = np.exp(x - x.max())
    cdf = np.cumsum(p / p.sum())
    return set(order[: int(np.searchsorted(cdf, top_p)) + 1].tolist())


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (10, 0.8)])
def test_sampling_is_seeded_and_respects_top_p(binary, export, tmp_path, top_k, top_p):
    """--top-p: the same seed gives the same tokens, another seed others, and every token is in the nucleus of the
    logits it was picked from (after the temperature and top-k; no repetition penalty here); sampling from the whole
    softmax would have stayed in those nuclei with a probability under 1%, so the check bites."""
    out, model = export(**MAIN)

    def sample(seed: int, dump: Path) -> list[int]:
        res = generate(binary, out, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW,
                       "--sample", "--temperature", 2.0, "--top-k", top_k, "--top-p", top_p, "--seed", seed,
                       "--dump-logits", dump)
        assert res["decoding"].startswith(f"sample (temperature 2.000000, top-k {top_k}, top-p {top_p:f}, seed {seed})")
        return ids(res["tokens"])

    first = sample(7, tmp_path / "a.f32")
    assert sample(7, tmp_path / "b.f32") == first
    assert sample(8, tmp_path / "c.f32") != first
    logits = np.fromfile(tmp_path / "a.f32", dtype=np.float32).reshape(N_NEW, -1)
    chance = 1.0
    for row, token in zip(logits, first):
        allowed = nucleus(row, 2.0, top_k, top_p)
        assert token in allowed
        x = row.astype(np.float64) / 2.0
        p = np.exp(x - x.max())
        chance *= p[sorted(allowed)].sum() / p.sum()
        assert len(allowed) < model.config.vocab_size
    assert chance < 0.01, chance


def test_sampling_with_repetition_penalty_and_top_p(binary, export):
    """Both together: seeded, and both named on the decoding line."""
    out, _ = export(**MAIN)
    args = ["--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", N_NEW, "--sample", "--top-p", 0.9,
            "--seed", 3]
    res = generate(binary, out, *args, "--repetition-penalty", 1.5)
    assert res["decoding"].startswith("sample (temperature 1.000000, top-k 0, top-p 0.900000, seed 3, repetition "
                                      "penalty 1.500000); ")
    assert generate(binary, out, *args, "--repetition-penalty", 1.5)["tokens"] == res["tokens"]
    assert generate(binary, out, *args)["tokens"] != res["tokens"]


def test_byte_level_text_prompt(binary, export):
    """--prompt TEXT is the UTF-8 bytes as ids, as in the Python runtime; the text line shows the new bytes."""
    from mamba_runtime import MambaRuntime

    out, _ = export(**BYTES_F16)
    text = generate(binary, out, "--prompt", "hi!", "--max-new-tokens", 6)
    as_ids = generate(binary, out, "--prompt-ids", "104,105,33", "--max-new-tokens", 6)
    assert text["tokens"] == as_ids["tokens"]
    tokens = ids(text["tokens"])
    assert tokens == list(MambaRuntime(out, provider="cpu", custom_ops="require").generate("hi!", 6).tokens[0])
    assert text["text"] == quoted(bytes(tokens))


def test_prompt_file_and_stdin(binary, export, tmp_path):
    """--prompt-file PATH (- for standard input) is --prompt with the file's bytes as they are: the same tokens as
    --prompt, bytes that are not UTF-8 as those ids, and a prompt past the 128 KiB a command-line argument holds."""
    out, _ = export(**BYTES_F16)
    (tmp_path / "p.txt").write_bytes(b"hi!")
    assert generate(binary, out, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 6)["tokens"] == \
        generate(binary, out, "--prompt", "hi!", "--max-new-tokens", 6)["tokens"]
    raw = b"a\xff\xfe\x00b"
    (tmp_path / "raw.bin").write_bytes(raw)
    from_file = generate(binary, out, "--prompt-file", tmp_path / "raw.bin", "--max-new-tokens", 4)
    assert from_file["tokens"] == generate(binary, out, "--prompt-ids", ",".join(map(str, raw)),
                                           "--max-new-tokens", 4)["tokens"]
    proc = subprocess.run([str(binary), str(out), "--prompt-file", "-", "--max-new-tokens", "4"], input=raw,
                          capture_output=True, timeout=120, env=program_env())
    assert proc.returncode == 0 and f"tokens: {from_file['tokens']}\n".encode() in proc.stdout
    long = bytes(np.random.default_rng(0).integers(32, 127, 140_000).astype(np.uint8))
    (tmp_path / "long.txt").write_bytes(long)
    res = generate(binary, out, "--prompt-file", tmp_path / "long.txt", "--max-new-tokens", 2)
    assert res["prefill"].startswith("140000 tokens")


def test_api_checks(binary, export):
    """runtime/cpp/tests/api_checks.cpp: chunked prefill, prefill + steps, reset, move, exceptions from the API (a
    refused generate() leaves the state as it was; a filesystem failure is a mamba::Error), stop sequences, Models
    made by share() (same tokens and logits as the original, their own states, 4 threads at once, alive after the
    original is destroyed or moved from, nothing read from the export directory), sampler frequencies against the
    softmax (top-k, top-p), the seeded streams of earlier versions, the repetition penalty (hand-computed values;
    generate() against the penalty applied by hand, greedy and sampled, across calls with reset false, after
    load_state and reset), bad top_p and repetition_penalty refused, SHA-256."""
    out, _ = export(**MAIN)
    proc = subprocess.run([str(binary.parent / "api_checks"), str(out)], capture_output=True, encoding="utf-8",
                          timeout=120, env=program_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok: ") == 68, proc.stdout


def test_help(binary):
    proc = run(binary, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: mamba_generate EXPORT_DIR")
    assert "  --stop TEXT " in proc.stdout
    assert "    --top-p P " in proc.stdout and "  --repetition-penalty R\n" in proc.stdout


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _edit_manifest(d: Path, edit) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


IDS = ["--prompt-ids", "1,2"]
# (name, how to break a copy of the export or None, arguments, a fragment the one error line must contain)
ERROR_CASES = [
    ("missing-dir", lambda d: shutil.rmtree(d), IDS, "export directory does not exist"),
    ("symlink-loop", lambda d: shutil.rmtree(d) or d.symlink_to(d), IDS, "Too many levels of symbolic links"),
    ("negative-seed", None, IDS + ["--sample", "--seed", "-1"], "--seed: expected a non-negative integer, found '-1'"),
    ("huge-seed", None, IDS + ["--sample", "--seed", "18446744073709551616"],
     "--seed: 18446744073709551616 is out of range [0, 18446744073709551615]"),
    ("not-an-export", lambda d: (d / "manifest.json").unlink(), IDS, "manifest.json: missing"),
    ("bad-json", lambda d: (d / "manifest.json").write_text('{"format_version": 1,'), IDS,
     "manifest.json: not valid JSON (line 1, column 22: unexpected end of text)"),
    ("deep-json", lambda d: (d / "manifest.json").write_text("[" * 100000), IDS, "nesting deeper than 128"),
    ("bad-escape", lambda d: (d / "manifest.json").write_text('{"a": "\\ud800"}'), IDS, "unpaired surrogate"),
    ("not-an-object", lambda d: (d / "manifest.json").write_text("[1, 2]"), IDS,
     "expected a JSON object, found an array"),
    ("missing-key", lambda d: _edit_manifest(d, lambda m: m["config"].pop("d_state")), IDS,
     "missing key 'config.d_state'"),
    ("bad-key-type", lambda d: _edit_manifest(d, lambda m: m["config"].update(n_layer="3")), IDS,
     "'config.n_layer' must be a number, found a string"),
    ("negative-size", lambda d: _edit_manifest(d, lambda m: m["config"].update(d_state=-1)), IDS,
     "'config.d_state' must be a positive integer, found -1"),
    ("huge-n-layer", lambda d: _edit_manifest(d, lambda m: m["config"].update(n_layer=100_000_000)),
     IDS + ["--no-verify"], "but manifest.json's n_layer 100000000 makes 200000001 of each"),
    ("format-version", lambda d: _edit_manifest(d, lambda m: m.update(format_version=99)), IDS,
     "format_version 99 is not supported"),
    ("bad-dtype", lambda d: _edit_manifest(d, lambda m: m.update(dtype=None)), IDS,
     "'dtype' must be one of \"float32\", \"float16\", \"bfloat16\""),
    ("nan", lambda d: (d / "manifest.json").write_text('{"format_version": NaN}'), IDS,
     "manifest.json: not valid JSON (line 1, column 20: expected a JSON value)"),
    ("config-mismatch", lambda d: _edit_manifest(d, lambda m: m["config"].update(d_state=9)), IDS,
     "input 'past_ssm.0' is float32 [?, 96, 8], expected float32 [?, 96, 9]"),
    ("library-path", lambda d: _edit_manifest(d, lambda m: m.update(custom_op_library="../x.so")), IDS,
     "custom_op_library must be a file name inside the export directory"),
    ("unlisted-library", lambda d: _edit_manifest(d, lambda m: m.update(custom_op_library="other.so")), IDS,
     "custom_op_library 'other.so' is not among the listed files"),
    ("missing-library", lambda d: (d / "libmamba_export_ops.so").unlink(), IDS,
     "libmamba_export_ops.so: missing (listed in manifest.json)"),
    ("missing-graph", lambda d: (d / "decode.onnx").unlink(), IDS, "decode.onnx: missing (listed in manifest.json)"),
    ("weights-a-directory", lambda d: (d / "weights.bin").unlink() or (d / "weights.bin").mkdir(), IDS,
     "weights.bin: not a regular file (listed in manifest.json)"),
    ("file-outside", lambda d: _edit_manifest(d, lambda m: m["files"].update({"../x": {"sha256": "0" * 64}})), IDS,
     "'files' lists '../x', which is not a file name inside the export directory"),
    ("corrupt-weights", lambda d: (d / "weights.bin").write_bytes(b"\x00" * 64), IDS,
     "weights.bin: sha256 does not match manifest.json"),
    # one bit: onnxruntime loads the file (its sha256 runs meanwhile), and the check still refuses it
    ("flipped-weight-bit", lambda d: _flip_bit(d / "weights.bin"), IDS,
     "weights.bin: sha256 does not match manifest.json"),
    ("broken-library", lambda d: (d / "libmamba_export_ops.so").write_bytes(b"not a library"), IDS + ["--no-verify"],
     "cannot register the custom-op library"),
    ("broken-graph", lambda d: (d / "model.onnx").write_bytes(b"\x00garbage"), IDS + ["--no-verify"],
     "model.onnx: cannot load"),
    ("id-out-of-range", None, ["--prompt-ids", "1,101"], "token id 101 at position 1 is out of range [0, 101)"),
    ("negative-id", None, ["--prompt-ids", "-1"], "token id -1 at position 0 is out of range"),
    ("not-an-id", None, ["--prompt-ids", "1,x"], "--prompt-ids: expected an integer, found 'x'"),
    ("stop-out-of-range", None, ["--prompt-ids", "1", "--stop-ids", "500"], "stop token id 500 is out of range"),
    ("text-without-bytes", None, ["--prompt", "hi"], "the vocabulary is not byte-level"),
    ("stop-without-bytes", None, IDS + ["--stop", "hi"],
     "--stop needs a byte-level vocabulary (byte_vocab.json in the export); give the stop token ids with --stop-ids"),
    ("empty-stop", None, IDS + ["--stop", "x", "--stop", ""], "--stop: empty stop string"),
    ("zero-new-tokens", None, ["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
    ("no-prompt", None, [], "give exactly one of --prompt-ids, --prompt and --prompt-file"),
    ("two-prompts", None, ["--prompt-ids", "1", "--prompt-file", "/dev/null"],
     "give exactly one of --prompt-ids, --prompt and --prompt-file"),
    ("prompt-file-missing", None, ["--prompt-file", "/nonexistent/p.txt"],
     "--prompt-file: /nonexistent/p.txt: cannot read it (No such file or directory)"),
    ("prompt-file-directory", None, ["--prompt-file", "/"], "--prompt-file: /: cannot read it (it is a directory)"),
    ("ort-config", None, IDS + ["--ort-config", "novalue"], "--ort-config: expected KEY=VALUE, found 'novalue'"),
    ("unknown-option", None, ["--prompt-ids", "1", "--fast"], "unknown option --fast"),
    ("sampling-flag", None, ["--prompt-ids", "1", "--top-k", "3"],
     "--temperature, --top-k, --top-p and --seed need --sample"),
    ("top-p-without-sample", None, ["--prompt-ids", "1", "--top-p", "0.5"],
     "--temperature, --top-k, --top-p and --seed need --sample"),
    ("top-p-zero", None, IDS + ["--sample", "--top-p", "0"], "top_p must be in (0, 1], found 0"),
    ("top-p-over-one", None, IDS + ["--sample", "--top-p", "1.5"], "top_p must be in (0, 1], found 1.5"),
    ("top-p-not-a-number", None, IDS + ["--sample", "--top-p", "half"], "--top-p: expected a number, found 'half'"),
    ("penalty-past-float", None, IDS + ["--repetition-penalty", "1e39"],
     "--repetition-penalty: 1e39 is outside the range of a float"),
    ("penalty-zero", None, IDS + ["--repetition-penalty", "0"],
     "repetition_penalty must be a finite number > 0 (1 = off), found 0"),
    ("penalty-negative", None, IDS + ["--sample", "--repetition-penalty", "-1"],
     "repetition_penalty must be a finite number > 0 (1 = off), found -1"),
    ("penalty-nan", None, IDS + ["--repetition-penalty", "nan"],
     "repetition_penalty must be a finite number > 0 (1 = off), found nan"),
    ("penalty-inf", None, IDS + ["--repetition-penalty", "inf"],
     "repetition_penalty must be a finite number > 0 (1 = off), found inf"),
    ("greedy-and-sample", None, ["--prompt-ids", "1", "--greedy", "--sample"],
     "--greedy and --sample exclude each other"),
    ("bad-temperature", None, ["--prompt-ids", "1", "--sample", "--temperature", "0"],
     "temperature must be a positive number"),
]


@pytest.mark.parametrize("breakage, args, fragment", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_are_one_line(binary, export, tmp_path, breakage, args, fragment):
    out, _ = export(**MAIN)
    target = out
    if breakage is not None:
        target = _copy(out, tmp_path)
        breakage(target)
    proc = run(binary, target, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba_generate: error: "), proc.stderr
    assert fragment in lines[0]
    assert "onnxruntime::" not in lines[0] and "[ONNXRuntimeError]" not in lines[0]


def test_a_graph_onnxruntime_cannot_load_is_one_line_without_its_log(binary, export, tmp_path):
    """weights.bin cut short (found by onnxruntime's optimizer here): onnxruntime printed its multi-line, coloured
    ERROR log before our line; now only our line, with onnxruntime's innermost message (not the C++ signatures of
    the functions that rethrew it)."""
    out, _ = export(**BYTES_F16)
    target = _copy(out, tmp_path)
    os.truncate(target / "weights.bin", 1000)
    proc = run(binary, target, "--prompt-ids", "1,2", "--no-verify")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mamba_generate: error: {target / 'model.onnx'}: cannot load: ")
    assert "onnxruntime::" not in lines[0] and "[ONNXRuntimeError]" not in lines[0]


def test_export_without_library_needs_no_custom_ops_flag(binary, export):
    out, _ = export(**NO_LIBRARY)
    proc = run(binary, out, "--prompt-ids", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("or re-export with the library")
    assert "custom_op_library is null" in proc.stderr


def test_empty_text_prompt(binary, export):
    out, _ = export(**BYTES_F16)
    proc = run(binary, out, "--prompt", "")
    assert proc.returncode == 2
    assert proc.stderr == "mamba_generate: error: empty prompt: give at least one token id\n"


def test_mutated_manifests_are_refused_in_one_line_or_run(binary, export, tmp_path):
    """80 seeded damaged manifest.json files (odd values, missing or extra keys, broken syntax, truncation): each
    runs or is refused with exit status 2 and one line; never a crash, a hang or an uncaught exception (under
    tools/sanitize.sh, never a sanitizer report either)."""
    from support import mutated_manifests

    out, _ = export(**MAIN)
    target = _copy(out, tmp_path)
    original = (out / "manifest.json").read_text()
    outcomes = {0: 0, 2: 0}
    for i, data in enumerate(mutated_manifests(original, 80, seed=6)):
        (target / "manifest.json").write_bytes(data)
        proc = run(binary, target, "--prompt-ids", "1,2", "--max-new-tokens", "2")
        case = f"mutation {i}: {data[:300]!r}\n{proc.stderr[-2000:]}"
        assert proc.returncode in outcomes, case
        outcomes[proc.returncode] += 1
        if proc.returncode == 2:
            lines = proc.stderr.splitlines()
            assert proc.stdout == "" and len(lines) == 1 and lines[0].startswith("mamba_generate: error: "), case
    assert outcomes[2] >= 25, outcomes  # many mutations break the manifest (the rest change fields nobody reads)


@pytest.mark.parametrize("raw", [b"\xff", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc3",
                                 b"\xe2\x82"], ids=["ff", "overlong-2", "overlong-3", "surrogate", "past-10ffff",
                                                   "cut-2", "cut-3"])
def test_strings_that_are_not_utf8_are_refused_as_python_refuses_them(binary, export, tmp_path, raw):
    """A manifest string holding bytes that are not UTF-8 is refused by both runtimes (Python's json reads bytes
    as strict UTF-8); well-formed multi-byte characters are read."""
    from mamba_runtime.manifest import parse_json

    out, _ = export(**MAIN)
    target = _copy(out, tmp_path)
    manifest = (out / "manifest.json").read_bytes().rstrip()[:-1]  # without its closing brace
    (target / "manifest.json").write_bytes(manifest + b', "note": "a' + raw + b'b"}')
    proc = run(binary, target, *IDS)
    assert proc.returncode == 2 and "invalid UTF-8 in string" in proc.stderr, proc.stderr
    with pytest.raises(ValueError):
        parse_json((target / "manifest.json").read_bytes())
    (target / "manifest.json").write_bytes(manifest + ', "note": "héllo € 𝄞"}'.encode())
    assert run(binary, target, *IDS).returncode == 0


@pytest.mark.parametrize("depth, refused", [(128, False), (129, True)])
def test_both_runtimes_refuse_the_same_nesting_depth(binary, export, tmp_path, depth, refused):
    """A value nested ``depth`` containers below the top-level object: both readers take 128 and refuse 129 (C++:
    kMaxDepth; Python: MAX_JSON_DEPTH), so a manifest one runtime opens never fails in the other for its depth."""
    from mamba_runtime import MambaRuntime
    from mamba_runtime.errors import ExportDirError

    out, _ = export(**MAIN)
    target = _copy(out, tmp_path)
    manifest = (out / "manifest.json").read_bytes().rstrip()[:-1]  # without its closing brace
    note = "[" * (depth - 1) + "1" + "]" * (depth - 1)  # the 1 sits `depth` below the object holding "note"
    (target / "manifest.json").write_bytes(manifest + f', "note": {note}}}'.encode())
    proc = run(binary, target, *IDS)
    if refused:
        assert proc.returncode == 2 and "nesting deeper than 128" in proc.stderr, proc.stderr
        with pytest.raises(ExportDirError, match=r"not valid JSON \(nesting deeper than 128\)"):
            MambaRuntime(target)
    else:
        assert proc.returncode == 0, proc.stderr
        MambaRuntime(target)
