"""mamba_runtime parts that need no exported model: sampling, text codecs, manifest checks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mamba_runtime import ExportDirError, GenerationInputError, SamplingConfig
from mamba_runtime.manifest import open_export_dir, parse_json
from mamba_runtime.sampling import Sampler, apply_repetition_penalty, sample_row
from mamba_runtime.tokenizer import ByteCodec, load_codec


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_inactive_rows_draw_nothing():
    logits = np.array([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]], dtype=np.float32)
    out = Sampler(SamplingConfig(), 2, 3)(logits, np.array([True, False]))
    assert out.tolist() == [1, -1]


def test_top_k_only_draws_the_k_best():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    best = set(np.argsort(-logits)[:3].tolist())
    cfg = SamplingConfig(temperature=5.0, top_k=3)
    draws = {sample_row(logits, cfg, rng) for _ in range(300)}
    assert draws == best


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    rng = np.random.default_rng(1)
    draws = {sample_row(logits, SamplingConfig(temperature=1.0, top_p=0.75), rng) for _ in range(400)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.8


def test_sampling_frequencies_follow_softmax_over_temperature():
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    rng = np.random.default_rng(2)
    counts = np.bincount([sample_row(logits, SamplingConfig(temperature=2.0), rng) for _ in range(6000)], minlength=3)
    p = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.03)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([[2.0, -2.0, 1.0]], dtype=np.float32)
    seen = np.array([[True, True, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0]])


def test_sampler_is_reproducible_per_row_and_seed():
    logits = np.random.default_rng(3).normal(size=(2, 40)).astype(np.float32)
    cfg = SamplingConfig(temperature=1.0, seed=7)
    a, b = Sampler(cfg, 2, 40), Sampler(cfg, 2, 40)
    draws_a = [a(logits, np.array([True, True])).tolist() for _ in range(20)]
    draws_b = [b(logits, np.array([True, True])).tolist() for _ in range(20)]
    assert draws_a == draws_b
    assert [d[0] for d in draws_a] != [d[1] for d in draws_a]  # rows draw from their own generators


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(repetition_penalty=0), dict(seed=-1), dict(temperature=float("nan")),
                                dict(temperature="hot"), dict(top_p=None), dict(repetition_penalty=[1.1]),
                                dict(temperature=True), dict(top_k=2.0), dict(top_k="5"), dict(seed=1.5),
                                dict(top_p=float("nan")), dict(temperature=np.array([1.0, 2.0]))])
def test_bad_sampling_settings_are_clear_errors(kw):
    with pytest.raises(GenerationInputError, match=next(iter(kw))) as e:
        SamplingConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(temperature=0.0, top_k=1)])
def test_top_k_and_top_p_without_a_temperature_are_refused(kw):
    """Greedy decoding (temperature 0) ignores them: refused as the CLI refuses --top-k without --temperature."""
    with pytest.raises(GenerationInputError, match="apply to sampling: give a temperature > 0"):
        SamplingConfig(**kw)
    assert SamplingConfig(temperature=0.5, **{k: v for k, v in kw.items() if k != "temperature"})


def test_numpy_scalars_are_accepted_as_sampling_settings():
    cfg = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float16(0.5),
                         repetition_penalty=np.int8(2), seed=np.uint64(3))
    assert cfg.to_dict() == dict(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=2.0, seed=3)
    assert [type(v) for v in cfg.to_dict().values()] == [float, int, float, float, int]


# ---- text ---------------------------------------------------------------------------------------------------------
def test_byte_codec_round_trips_and_streams_multibyte_characters():
    codec = ByteCodec()
    text = "héllo, 世界 ✓"
    ids = codec.encode(text)
    assert ids == list(text.encode("utf-8")) and codec.decode(ids) == text
    stream = codec.stream()
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # the first bytes of a multi-byte character print nothing yet
    assert codec.decode([104, 300, 105]) == "h\ufffdi"  # ids past the bytes (vocabulary padding)


def test_text_that_is_not_unicode():
    """Bytes that are not UTF-8 in a command line reach Python as surrogateescape (U+DC80-U+DCFF): a byte-level model
    gets those very bytes. Any other lone surrogate is a one-line GenerationInputError, for both codecs."""
    raw = b"And \xff\xfe"
    text = raw.decode("utf-8", "surrogateescape")
    assert ByteCodec().encode(text) == list(raw)
    with pytest.raises(GenerationInputError, match=r"lone surrogate \(U\+D800\) at character 2; pass token ids"):
        ByteCodec().encode("ab\ud800c")


# ---- manifest -----------------------------------------------------------------------------------------------------
def _fake_export(d, **overrides):
    d.mkdir()
    files = {}
    for name in ("model.onnx", "decode.onnx", "weights.bin"):
        (d / name).write_bytes(name.encode())
        files[name] = {"sha256": hashlib.sha256(name.encode()).hexdigest(), "bytes": len(name)}
    manifest = {"format_version": 1, "format": "onnx", "dtype": "float32", "custom_op_library": None, "files": files,
                "config": {"n_layer": 2, "d_inner": 8, "d_conv": 4, "d_state": 4, "vocab_size": 10},
                "tokenizer": {"files": []}}
    manifest.update(overrides)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def _edit(d, change):
    manifest = json.loads((d / "manifest.json").read_text())
    change(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_a_consistent_manifest_opens(tmp_path):
    info = open_export_dir(_fake_export(tmp_path / "e"))
    assert (info.n_layer, info.prefill_graph, info.library) == (2, "model.onnx", None)
    assert info.state_shapes(3) == ((3, 8, 3), (3, 8, 4))


@pytest.mark.parametrize("break_it, message", [
    (lambda d: None, "does not exist"),
    (lambda d: _fake_export(d) and (d / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text("[" * 100000 + "]" * 100000),
     r"manifest.json: not valid JSON \(nesting deeper than 128\)"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text('{"a": ' * 100000),
     r"not valid JSON \(nesting deeper than 128\)"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_bytes(b'{"a": "\xff"}'), "not valid JSON"),
    (lambda d: _fake_export(d, format_version=99), "format_version 99 is not supported"),
    (lambda d: _fake_export(d, format="torchscript"), "this runtime runs ONNX exports"),
    (lambda d: _fake_export(d) and (d / "decode.onnx").unlink(), "decode.onnx: missing"),
    (lambda d: _fake_export(d) and (d / "weights.bin").unlink() or (d / "weights.bin").mkdir(),
     "weights.bin: not a regular file"),
    (lambda d: _fake_export(d, files={"../model.onnx": {"sha256": "0" * 64}}),
     "lists '../model.onnx', which is not a file name inside the export directory"),
    (lambda d: _fake_export(d) and (d / "weights.bin").write_bytes(b"changed"), "weights.bin: sha256 does not match"),
    (lambda d: _fake_export(d, config={"n_layer": 0}), "config.n_layer must be a positive integer"),
    (lambda d: _fake_export(d, custom_op_library="lib.so"), "not among the listed files"),
    # read as the C++ runtime reads them (tests/test_cpp_runtime.py has the same cases)
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text('{"format_version": NaN}'),
     r"not valid JSON \(NaN is not a JSON value\)"),
    (lambda d: _fake_export(d, config={"n_layer": 2, "d_inner": 8, "d_conv": 1, "d_state": 4, "vocab_size": 10}),
     "config.d_conv must be at least 2, found 1"),
    (lambda d: _fake_export(d, custom_op_library={}), "custom_op_library must be a file name or null, found an object"),
    (lambda d: _edit(_fake_export(d), lambda m: m.pop("custom_op_library")), "missing key 'custom_op_library'"),
    (lambda d: _edit(_fake_export(d), lambda m: m.pop("tokenizer")), "'tokenizer' must be an object, found null"),
    (lambda d: _fake_export(d, tokenizer={"files": 3}), "'tokenizer.files' must be an array of file names"),
    (lambda d: _fake_export(d, dtype=["float32"]), r"dtype \['float32'\] is not one of"),
    (lambda d: _fake_export(d, format_version=True), "format_version True is not supported"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text('{"a": "\\ud800"}'),
     r"not valid JSON \(a string holds an unpaired surrogate"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_bytes(b'{"a": "\xed\xa0\x80"}'),
     "not valid JSON .'utf-8' codec can't decode byte 0xed"),
    (lambda d: _fake_export(d) and (d / "manifest.json").write_text("[1, 2]"),
     "expected a JSON object, found an array"),
])
def test_broken_export_dirs_are_one_line_errors(tmp_path, break_it, message):
    d = tmp_path / "e"
    break_it(d)
    with pytest.raises(ExportDirError, match=message) as e:
        open_export_dir(d)
    assert "\n" not in str(e.value)


def test_a_file_instead_of_a_directory_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ExportDirError, match="not a directory"):
        open_export_dir(tmp_path / "f")


def test_a_tokenizer_json_encodes_decodes_and_streams(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    codec = load_codec(tmp_path)
    ids = codec.encode("hello world")
    assert codec.decode(ids) == "hello world" and len(ids) == 11
    stream = codec.stream()
    assert "".join(stream.push(t) for t in ids) + stream.flush() == "hello world"
    with pytest.raises(GenerationInputError, match=r"lone surrogate \(U\+DCFF\)"):
        codec.encode("hello \udcff")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{broken", "not a valid tokenizer.json"),
    ("byte_vocab.json", "[1, 2]", "expected"),
    ("byte_vocab.json", "{nope", "not valid JSON"),
    ("byte_vocab.json", "[" * 100000 + "]" * 100000, r"not valid JSON \(nesting deeper than 128\)"),
])
def test_broken_tokenizer_files_are_export_dir_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ExportDirError, match=message) as e:
        load_codec(tmp_path)
    assert "\n" not in str(e.value)


def test_no_tokenizer_file_means_token_ids_only(tmp_path):
    assert load_codec(tmp_path) is None


def test_provider_choice_is_explicit():
    import onnxruntime as ort

    from mamba_runtime.device import CpuDevice, select_device

    assert isinstance(select_device("cpu"), CpuDevice)
    with pytest.raises(GenerationInputError, match="provider must be one of cpu, cuda, auto"):
        select_device("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert isinstance(select_device("auto"), CpuDevice)
        with pytest.raises(GenerationInputError, match="no CUDAExecutionProvider"):
            select_device("cuda")


@pytest.mark.parametrize("text, deepest", [("[" * 129 + "]" * 129, 128), ('{"a": ' * 128 + "1" + "}" * 128, 128),
                                           ("[" * 130 + "]" * 130, 129), ('{"a": ' * 129 + "1" + "}" * 129, 129),
                                           ("[" * 129 + "2" + "]" * 129, 129)])
def test_json_nesting_is_limited_to_the_cpp_readers_depth(text, deepest):
    """parse_json takes values up to 128 containers below the top-level value and refuses deeper ones, as the C++
    runtime's reader does (its messages say the same)."""
    if deepest <= 128:
        assert parse_json(text) is not None
    else:
        with pytest.raises(ValueError, match=r"^nesting deeper than 128$"):
            parse_json(text)


# ---- stop strings -------------------------------------------------------------------------------------------------
def _bpe_codec(tmp_path):
    """A tokenizer.json whose tokens are letters, pairs of letters and words: a stop string can lie inside one
    token, end in the middle of one, or span several."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("Ġ", "the"), ("Ġ", "and"), ("e", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    return load_codec(tmp_path)


def _decoded(codec, tokens):
    """The complete characters of ``tokens``, decoded incrementally (a character cut between byte tokens, or a
    partial one at the end, is not there yet)."""
    stream = codec.stream()
    return "".join(stream.push(t) for t in tokens)


def _reference_stop(codec, tokens, strings):
    """Independently of StopText: the first token whose prefix's text (decoded afresh) holds a stop string, where
    the earliest match starts and that text; Nones when none matches."""
    for n in range(1, len(tokens) + 1):
        text = _decoded(codec, tokens[:n])
        starts = [text.find(s) for s in strings if s in text]
        if starts:
            return n - 1, min(starts), text
    return None, None, None


def _longest_held(text, strings):
    """The longest end of ``text`` that begins some stop string (what must not be shown yet)."""
    return max((k for k in range(1, len(text) + 1) for s in strings if s.startswith(text[-k:])), default=0)


@pytest.mark.parametrize("kind", ["bytes", "tokenizer.json"])
def test_stop_text_finds_the_first_match_and_shows_only_text_before_it(kind, tmp_path):
    """Against a brute-force reference, over random token sequences and stop strings: the token that completes the
    first match, where the text is cut, and what streaming shows at each token (all but the longest end that could
    still start a stop string; never a stop string; in the end exactly the cut text)."""
    from mamba_runtime.stopping import StopText

    rng = np.random.default_rng(0)
    codec = ByteCodec() if kind == "bytes" else _bpe_codec(tmp_path)
    if kind == "bytes":  # mostly ASCII, with multi-byte characters cut between tokens, and some invalid bytes
        alphabet = list(b"ab \n") + list("é€".encode()) + [0xFF]
    else:
        alphabet = list(range(len(codec._tok.get_vocab())))
    matched = 0
    for trial in range(300):
        tokens = [int(t) for t in rng.choice(alphabet, size=int(rng.integers(1, 40)))]
        full = _decoded(codec, tokens)
        strings = []
        for _ in range(int(rng.integers(1, 4))):  # pieces of this text (so that most trials match), or random
            if full and rng.random() < 0.7:
                i = int(rng.integers(0, len(full)))
                strings.append(full[i:i + int(rng.integers(1, 5))])
            else:
                strings.append("".join(rng.choice(list("ab \né"), size=int(rng.integers(1, 4)))))
        strings = tuple(dict.fromkeys(strings))
        want_at, want_cut, text_then = _reference_stop(codec, tokens, strings)
        watch, shown, stopped_at = StopText(codec.stream(), strings), "", None
        for n, t in enumerate(tokens):
            stop = watch.push(t)
            shown += watch.take()
            if stop:
                stopped_at = n
                break
            decoded = _decoded(codec, tokens[:n + 1])
            assert shown == decoded[:len(decoded) - _longest_held(decoded, strings)], (trial, n)
        shown += watch.finish()
        assert stopped_at == want_at, trial
        assert not any(s in shown for s in strings), trial
        if want_at is None:
            assert watch.cut is None and shown == codec.decode(tokens), trial
        else:
            matched += 1
            assert watch.cut == want_cut and watch.text() == shown == text_then[:want_cut], trial
    assert matched > 150  # the trials did exercise matches


def test_stop_strings_are_checked():
    from mamba_runtime.stopping import check_stop_strings

    assert check_stop_strings("ab") == ("ab",) and check_stop_strings(["x", "y", "x"]) == ("x", "y")
    assert check_stop_strings(()) == ()
    for bad, message in ((["a", ""], r"must not be empty: an empty one would stop at once \(item 1\)"),
                         ([b"ab"], r"must be strings, found bytes \(item 0\)"),
                         (5, "must be a string or a list of strings, not int")):
        with pytest.raises(GenerationInputError, match=message):
            check_stop_strings(bad)


def _tokenizer_codec(tmp_path, model, decoder, pre_tokenizer=None):
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.save(str(tmp_path / "tokenizer.json"))
    return load_codec(tmp_path)


@pytest.mark.parametrize("kind", ["bytes", "failing-decoder"])
def test_a_tokenizer_json_stream_gives_in_all_what_decode_gives(kind, tmp_path):
    """Pushed token by token and flushed, a tokenizer.json stream gives exactly decode(ids): with byte tokens a
    generation that ends inside a character ends with its U+FFFD, as decode has it (tokenizers' DecodeStream holds
    such text back, and flush gave nothing); a decoder whose DecodeStream raises (a Replace across tokens) decodes
    every token so far instead of failing (both found by an audit helper)."""
    from tokenizers import decoders, models, pre_tokenizers

    rng = np.random.default_rng(0)
    if kind == "bytes":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        codec = _tokenizer_codec(tmp_path, models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]),
                                 decoders.ByteLevel(), pre_tokenizers.ByteLevel(add_prefix_space=False))
        ids_of = [codec.encode(c) for c in "aé€😀 "]  # characters of 1 to 4 byte tokens, cut anywhere below
    else:
        codec = _tokenizer_codec(tmp_path, models.WordLevel(vocab={c: i for i, c in enumerate("abcdefghijklm")},
                                                            unk_token="a"),
                                 decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")]))
        ids_of = [[i] for i in range(13)]
    held_back = failed = 0
    for _ in range(300):
        ids = [t for j in rng.integers(0, len(ids_of), 12) for t in ids_of[j]][:int(rng.integers(1, 30))]
        stream = codec.stream()
        shown = "".join(stream.push(t) for t in ids)
        whole = codec.decode(ids)
        held_back += whole != shown
        failed += stream._whole
        if whole.startswith(shown):  # text already shown is never taken back; a Replace can rewrite it
            assert shown + stream.flush() == whole
        else:
            assert kind == "failing-decoder"
    if kind == "bytes":  # cut characters were common, and DecodeStream never failed
        assert held_back > 30 and failed == 0
    else:
        assert failed > 10


def test_stop_strings_refuse_bytes_and_lone_surrogates():
    from mamba_runtime.stopping import check_stop_strings

    with pytest.raises(GenerationInputError, match=r"stop strings must be text \(str\), not bytes"):
        check_stop_strings(b"ab")
    with pytest.raises(GenerationInputError, match=r"item 1 has a lone surrogate \(U\+DC80\).*use stop tokens"):
        check_stop_strings(["ok", "a\udc80"])
