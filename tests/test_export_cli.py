"""``mamba-export export``: the command line, atomic writes and the user errors (one line, exit status 2)."""

from __future__ import annotations

import json

import pytest

from mamba_export import cli
from mamba_export.errors import MambaExportError
from mamba_export.export import ExportError, api, export_checkpoint
from support import make_hf_model, save_transformers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf_model("tiny")
    out = save_transformers(hf, root / "ckpt")
    (out / "tokenizer.json").write_text("{}")  # any tokenizer file in the checkpoint is copied and listed
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_export_then_refuse_overwrite_then_force(ckpt, tmp_path, capsys):
    out = tmp_path / "sub" / "export"
    assert cli.main(["export", str(ckpt), "-o", str(out), "--no-library"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "exporting decode.onnx" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["files"] == ["tokenizer.json"] and "tokenizer.json" in manifest["files"]
    assert manifest["decode_blocks"] is False  # --decode-blocks auto (the default) is off
    (out / "marker").write_text("old")
    assert cli.main(["export", str(ckpt), "-o", str(out), "--no-library"]) == 2
    assert "already exists" in _error_line(capsys) and (out / "marker").exists()
    assert cli.main(["export", str(ckpt), "-o", str(out), "--no-library", "--force", "--format", "torchscript"]) == 0
    assert not (out / "marker").exists() and (out / "model.pt").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["export"]  # no temporary directories left


def test_failed_export_leaves_nothing_and_keeps_the_old_directory(ckpt, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(api, "build_manifest", fail)  # the last step: every other file is written by then
    with pytest.raises(RuntimeError, match="injected"):
        export_checkpoint(ckpt, tmp_path / "new", fmt="torchscript")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"  # a previous export (only those are replaced under force)
    old.mkdir()
    (old / "manifest.json").write_text('{"format_version": 1}')
    (old / "keep").write_text("x")
    with pytest.raises(RuntimeError, match="injected"):
        export_checkpoint(ckpt, old, fmt="torchscript", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "keep").read_text() == "x"


@pytest.mark.parametrize("case", ["not an export", "the current directory", "the checkpoint itself", "empty name"])
def test_force_never_replaces_what_it_should_not(ckpt, tmp_path, capsys, monkeypatch, case):
    """--force replaces an export directory, nothing else: a directory of other files, the current directory (or one
    containing it), the checkpoint being exported (or one containing it), and not "" (which would be the current
    directory). Each is a one-line error before any work, with every file left in place."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    (work / "manifest.json").write_text('{"format_version": 1}')  # even a previous export, in the cases below
    monkeypatch.chdir(work)
    src, dst, expect = {
        "not an export": (ckpt, tmp_path / "other", "is not an export directory"),
        "the current directory": (ckpt, ".", "is the current directory"),
        "the checkpoint itself": (ckpt, ckpt, "contains the checkpoint"),
        "empty name": (ckpt, "", "name is empty"),
    }[case]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("1,2")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ckpt_files = sorted(p.name for p in ckpt.iterdir())
    assert cli.main(["export", str(src), "-o", str(dst), "--no-library", "--force"]) == 2
    assert expect in _error_line(capsys)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.name for p in ckpt.iterdir()) == ckpt_files and (work / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("case", ["missing checkpoint", "output under a file", "output is a file"])
def test_bad_paths_are_one_line_errors(ckpt, tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    src, dst = {
        "missing checkpoint": (tmp_path / "nope", tmp_path / "out"),
        "output under a file": (ckpt, tmp_path / "file" / "out"),
        "output is a file": (ckpt, tmp_path / "file"),
    }[case]
    assert cli.main(["export", str(src), "-o", str(dst), "--no-library", "--force"]) == 2
    line = _error_line(capsys)
    assert line.startswith("mamba-export export: error: ") and str(src if case.startswith("missing") else dst) in line


def test_unknown_dtype_and_format(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(ckpt), "-o", str(tmp_path / "o"), "--dtype", "bfloat16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "invalid choice" in err[0] and "--help" in err[0]
    with pytest.raises(ExportError, match="unknown dtype 'int8'"):
        export_checkpoint(ckpt, tmp_path / "o", dtype="int8")
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export_checkpoint(ckpt, tmp_path / "o", fmt="tflite")
    assert not (tmp_path / "o").exists()


def test_missing_library_says_how_to_build_it(ckpt, tmp_path, capsys, monkeypatch):
    import mamba_runtime

    def not_built():
        raise MambaExportError("custom-op library libmamba_export_ops.so not found; build it with: "
                               "bash tools/build_custom_ops.sh")

    monkeypatch.setattr(mamba_runtime, "custom_op_library_path", not_built)
    assert cli.main(["export", str(ckpt), "-o", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "bash tools/build_custom_ops.sh" in line and "--no-library" in line
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_leaves_early_is_no_error(ckpt):
    """`mamba-export inspect CKPT | head -1`: the closed pipe ends the command quietly (status 141, as SIGPIPE)."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.run([sys.executable, "-m", "mamba_export.cli", "inspect", str(ckpt)], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_symlinked_output_is_followed_and_a_dangling_one_refused(ckpt, tmp_path, capsys):
    """-o LINK writes (and with --force replaces) the directory the link points to, leaving the link and no hidden
    directory behind; a link to nothing is a one-line error before any work."""
    target, link = tmp_path / "target", tmp_path / "link"
    assert cli.main(["export", str(ckpt), "-o", str(target), "--no-library", "--format", "torchscript"]) == 0
    link.symlink_to(target)
    (target / "marker").write_text("old")
    assert cli.main(["export", str(ckpt), "-o", str(link), "--no-library", "--force", "--format", "torchscript"]) == 0
    capsys.readouterr()
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.pt").is_file() and not (target / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert cli.main(["export", str(ckpt), "-o", str(dangling), "--no-library"]) == 2
    line = _error_line(capsys)
    assert "is a symbolic link to" in line and line.endswith("which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "target"]


def test_the_library_is_checked_and_shipped_under_its_contract_name(ckpt, tmp_path, capsys, monkeypatch):
    """$MAMBA_EXPORT_OPS_LIBRARY may name the library anything: the export ships it as libmamba_export_ops.so; a file
    onnxruntime cannot load as a custom-op library is refused before the export."""
    import shutil

    from mamba_runtime import custom_op_library_path

    renamed = tmp_path / "my_ops_build.so"
    shutil.copy2(custom_op_library_path(), renamed)
    monkeypatch.setenv("MAMBA_EXPORT_OPS_LIBRARY", str(renamed))
    out = export_checkpoint(ckpt, tmp_path / "out")
    assert (out / "libmamba_export_ops.so").is_file() and not (out / renamed.name).exists()
    assert json.loads((out / "manifest.json").read_text())["custom_op_library"] == "libmamba_export_ops.so"
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    monkeypatch.setenv("MAMBA_EXPORT_OPS_LIBRARY", str(junk))
    assert cli.main(["export", str(ckpt), "-o", str(tmp_path / "bad")]) == 2
    line = _error_line(capsys)
    assert "junk.so: cannot load the custom-op library" in line and "--no-library" in line
    assert not (tmp_path / "bad").exists()


def test_sigterm_during_an_export_leaves_nothing(ckpt, tmp_path):
    """SIGTERM (what `timeout` and service managers send) stops an export as Ctrl-C does: the half-written hidden
    directory is removed, one line says so, and the exit status is 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mamba_export.cli", "export", str(ckpt), "-o", str(out),
                             "--no-library"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the export ended before its temporary directory was seen"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "mamba-export export: terminated"
    assert list(tmp_path.iterdir()) == []
