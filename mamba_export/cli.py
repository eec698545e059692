"""The ``mamba-export`` command line.

Each subcommand lives in ``mamba_export/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``;
heavy imports (torch, onnxruntime) happen inside ``run`` so that ``--help`` is instant and ``generate`` needs no torch.
User errors (:class:`~mamba_export.errors.MambaExportError`) print one line and exit with status 2; a command stopped
by a signal after saving its work (:class:`~mamba_export.errors.Interrupted`) prints one line and exits with 128 + the
signal's number.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import Interrupted, MambaExportError

# The optional packages a command may import, and the extra of pyproject.toml that installs each (None: the package
# itself, from PyPI).
_EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
           "matplotlib": "export", "triton": None, "tokenizers": "text"}


def install_hint(module: str, extra: str | None) -> str:
    """The pip command that installs ``module``: its extra of this project, from the checkout this package was
    installed from when it is one (mamba-export is not on PyPI), else the package itself."""
    if extra is None:
        return f"pip install {module}"
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # an editable install: the checkout is right here
        return f"pip install {shlex.quote(f'{root}[{extra}]')}"
    return f"pip install '.[{extra}]' in your mamba-export checkout"
# One entry per subcommand module in mamba_export/commands/, in the order --help lists them.
COMMANDS = ("inspect", "export", "train", "generate", "profile")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a command cleans up the same way (a
    half-written export directory is removed); the CLI then exits with 143. Training installs its own handlers while
    it steps (a signal there stops the run after a saved step) and puts this one back after."""


def _on_sigterm(signum, frame):
    raise _Terminated()


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line errors: ``prog: error: message (see prog --help)``, exit status 2 (the
    subcommands' parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mamba-export",
        description="Export trained Mamba checkpoints to ONNX/TorchScript and run them with onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"mamba-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"mamba_export.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        return int(args.run(args) or 0)
    except Interrupted as e:
        print(f"mamba-export {args.command}: {e}", file=sys.stderr)
        return e.exit_status
    except MambaExportError as e:
        print(f"mamba-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a runtime-only install (numpy + onnxruntime) running export, train, inspect
        module = (e.name or "").split(".")[0]
        if module not in _EXTRAS:
            raise
        print(f"mamba-export {args.command}: error: this command needs {e.name!r}, which is not installed "
              f"({install_hint(module, _EXTRAS[module])})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"mamba-export {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as a tool killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


if __name__ == "__main__":
    sys.exit(main())
