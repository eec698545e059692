"""``mamba-export profile`` on a tiny export: runs quickly, writes its JSON, Markdown and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mamba_export.cli import main
from mamba_export.export import export_checkpoint
from mamba_runtime.manifest import open_export_dir
from mamba_runtime.profiling import decode_bytes_per_step, weight_bytes_per_token
from support import library_built, make_hf_model, save_state_spaces


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    hf = make_hf_model("tiny")
    ckpt = save_state_spaces(hf, root / "ckpt")
    out = export_checkpoint(ckpt, root / "export", last_logits=True, with_library=library_built())
    return root, ckpt, out, hf


def test_profile_writes_json_markdown_and_plots(exp, capsys):
    root, ckpt, out, _ = exp
    dest = root / "prof"
    rc = main(["profile", str(out), "--threads", "1", "--batch", "1,3", "--prompt-len", "4,9", "--gen-len", "8",
               "--position-tokens", "300", "--repeats", "2", "--compare-torch", str(ckpt), "-o", str(dest)])
    assert rc == 0
    report = json.loads((dest / "profile.json").read_text())
    assert {"machine", "settings", "runtime", "torch", "decode_floor_ms", "sequence_bytes_per_step"} <= set(report)
    assert report["machine"]["versions"]["onnxruntime"] and report["settings"]["batch"] == [1, 3]
    assert report["settings"]["decode_weight_dtype"] == "float32"
    rt = report["runtime"]
    assert [(p["batch"], p["prompt_len"]) for p in rt["prefill"]] == [(1, 4), (1, 9), (3, 4), (3, 9)]
    assert [d["batch"] for d in rt["decode"]] == [1, 3] and [d["batch"] for d in report["torch"]["decode"]] == [1, 3]
    for d in rt["decode"]:
        s = d["decode"]
        assert s["n"] == 8 and 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
        assert d["tokens_per_s"] > 0 and d["achieved_GBps"] == pytest.approx(d["bytes_per_step"] / s["p50_ms"] / 1e6)
        # the floor of each batch: the weights once and every sequence's own bytes, over the measured bandwidth
        assert d["bytes_per_step"] == decode_bytes_per_step(open_export_dir(out), d["batch"])
        assert d["floor_ms"] == pytest.approx(d["bytes_per_step"] / report["read_bandwidth_GBps"] / 1e6)
        assert s["min_ms"] <= s["mean_ms"] and d["tokens_per_s"] == pytest.approx(d["batch"] / s["mean_ms"] * 1e3)
    assert report["decode_floor_ms"] == pytest.approx(rt["decode"][0]["floor_ms"])  # batch 1
    one, three = (d["bytes_per_step"] for d in rt["decode"])
    assert three - one == 2 * report["sequence_bytes_per_step"]
    assert rt["position"]["tokens"] == 300 and len(rt["position"]["windows"]) == 20
    assert rt["warmup_s"] > 0 and rt["peak_rss_bytes"] > 0
    top = rt["top_operators"]
    ops = [o["op"] for o in top["ops"]]
    assert "MatMul" in ops and ("DecodeStep" in ops) == (report["custom_op_library"] is not None)
    assert top["steps"] == 8 and top["warmup_steps"] == 5  # --gen-len 8 steps profiled, the warm-up ones dropped
    # medians of a step's time per op type: together at most about the profiled step itself
    assert 0 < sum(o["ms_per_step"] for o in top["ops"]) <= top["step_ms"] * 1.2
    assert sum(o["share"] for o in top["ops"]) == pytest.approx(1.0)  # the top 10 and a row for any others
    assert sum(o["ms_per_step"] for o in top["ops"]) == pytest.approx(top["kernel_ms"])
    md = (dest / "profile.md").read_text()
    assert "| runtime | 3 |" in md and "PyTorch reference" in md and md in capsys.readouterr().out
    assert "(decode weights float32)" in md and "| floor ms | x floor |" in md
    for png in ("latency_vs_position.png", "latency_vs_batch.png"):
        assert (dest / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_bytes_count_every_parameter_a_step_reads(exp):
    """float32 tiny model with a tied head: all parameters once, plus one embedding row for the lookup."""
    *_, out, hf = exp
    n_params = sum(p.numel() for p in hf.parameters())  # tied: the embedding matrix is counted once (as the head)
    d_model = hf.config.hidden_size
    assert weight_bytes_per_token(open_export_dir(out)) == 4 * (n_params + d_model)


def test_decode_bytes_count_the_weights_once_and_each_sequences_state_logits_and_embedding_row(exp):
    """Per extra sequence a step moves its state in and out, its logits out, its token id in and one more embedding
    row: counted here from decode.onnx's own input and output shapes, not from the manifest."""
    import onnx

    *_, out, hf = exp
    graph = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph

    def per_sequence_bytes(values) -> int:  # float32 / int64 values of one sequence: batch dimension dropped
        size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT64: 8}
        total = 0
        for v in values:
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
            assert all(dims), (v.name, dims)  # the sequence axis of input_ids is 1 in decode.onnx
            total += size[v.type.tensor_type.elem_type] * int(np.prod(dims))
        return total

    moved = per_sequence_bytes(graph.input) + per_sequence_bytes(graph.output)  # state in, out; logits; the id
    row = 4 * hf.config.hidden_size
    info = open_export_dir(out)
    assert decode_bytes_per_step(info, 1) == weight_bytes_per_token(info) + moved
    assert decode_bytes_per_step(info, 5) == weight_bytes_per_token(info) + 5 * moved + 4 * row


def test_profile_bad_options_exit_2_with_one_line(exp, capsys):
    *_, out, _ = exp
    assert main(["profile", str(out), "--gen-len", "0"]) == 2
    assert "error: --gen-len must be a positive integer" in capsys.readouterr().err
    for batch in ("0,2", "1,,2", "8,"):
        with pytest.raises(SystemExit) as e:
            main(["profile", str(out), "--batch", batch])
        assert e.value.code == 2 and "comma-separated positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["output under a file", "output is a file", "missing checkpoint to compare",
                                  "existing directory that cannot be written"])
def test_profile_bad_paths_fail_first_with_one_line(exp, capsys, tmp_path, monkeypatch, case):
    """A profile that cannot be written, or a --compare-torch checkpoint that is not there, fails before the
    measurements (made to raise here if they start) with one line, leaving nothing behind."""
    *_, out, _ = exp
    (tmp_path / "file").write_text("x")
    args = {"output under a file": ["-o", str(tmp_path / "file" / "prof")],
            "output is a file": ["-o", str(tmp_path / "file")],
            "missing checkpoint to compare": ["-o", str(tmp_path / "prof"), "--compare-torch", str(tmp_path / "no")],
            # a directory that exists (the files go into it) where nothing can be made, whoever runs the test
            "existing directory that cannot be written": ["-o", "/proc/self"]}
    import mamba_export.commands.profile as command

    def started(*a, **k):
        raise AssertionError("the measurements started")

    monkeypatch.setattr(command, "_measure_runtime", started)
    assert main(["profile", str(out), "--gen-len", "2", *args[case]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mamba-export profile: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_profile_fewer_position_tokens_than_windows(exp):
    """5 tokens against position: 5 windows of one step each (20 windows would leave some empty)."""
    from mamba_runtime import MambaRuntime
    from mamba_runtime.profiling import latency_vs_position

    *_, out, _ = exp
    res = latency_vs_position(MambaRuntime(out, provider="cpu", threads=1), 5)
    assert [w["position"] for w in res["windows"]] == [1, 2, 3, 4, 5] and res["last_over_first"] > 0


def test_decode_floor_bandwidth_source(monkeypatch):
    """The floor's bandwidth: the host's on the CPU; on CUDA the GPU's, or the host's with the reason when the GPU
    measurement fails (here it is made to fail, as it does without CuPy)."""
    from mamba_export.commands import profile as cmd
    from mamba_runtime import profiling as prof

    monkeypatch.setattr(prof, "read_bandwidth_gbs", lambda threads: 40.0)
    assert cmd._bandwidth("cpu", 1) == (40.0, "host memory read bandwidth")
    monkeypatch.setattr(prof, "device_bandwidth_gbs", lambda: 3000.0)
    assert cmd._bandwidth("cuda", 1) == (3000.0, "GPU copy bandwidth (read + write)")

    def no_cupy():
        raise ModuleNotFoundError("No module named 'cupy'")

    monkeypatch.setattr(prof, "device_bandwidth_gbs", no_cupy)
    fallback = (40.0, "host memory read bandwidth (GPU measurement failed: ModuleNotFoundError)")
    assert cmd._bandwidth("cuda", 1) == fallback


@pytest.mark.parametrize("manifest, dtype, library, shown", [("float32", "float16", True, "float16"),
                                                             ("int8", "float32", True, "int8"),
                                                             ("float16", "float32", False, "float32"),
                                                             ("float32", "float32", True, "float32")])
def test_the_header_names_the_decode_weights_the_floor_counts(manifest, dtype, library, shown):
    """A float16 export's manifest says decode_weight_dtype "float32" (no narrow copies): its matrices are float16,
    as the header now says; narrow copies count only where the library multiplies them."""
    from mamba_export.commands.profile import _decode_weight_dtype

    report = {"settings": {"decode_weight_dtype": manifest, "dtype": dtype},
              "custom_op_library": "lib.so" if library else None}
    assert _decode_weight_dtype(report) == shown
