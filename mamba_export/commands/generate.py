"""``mamba-export generate OUT_DIR``: generate with the torch-free runtime (mamba_runtime) from an export directory."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from ..errors import MambaExportError


def _ids(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if items == [""]:
        return []
    try:
        ids = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if any(i < 0 or i >= 2**63 for i in ids):
        bad = next(i for i in ids if i < 0 or i >= 2**63)
        raise argparse.ArgumentTypeError(f"token ids are non-negative integers below 2**63, found {bad}")
    return ids


def ort_config_entry(text: str) -> tuple[str, str]:
    """--ort-config KEY=VALUE (also used by profile)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an onnxruntime session config entry), found {text!r}")
    return key.strip(), value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text or tokens from an export directory (onnxruntime, no torch)",
        description="Run an export directory with the Python runtime: prefill the prompt, then decode one token per "
        "step. Greedy unless --temperature is given. Text needs tokenizer.json or byte_vocab.json in the export.",
    )
    p.add_argument("export_dir", metavar="OUT_DIR", help="directory written by 'mamba-export export'")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the export)")
    prompt.add_argument("--prompt-ids", type=_ids, metavar="1,2,3", help="prompt as comma-separated token ids")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="prompt text read from a file, or - for standard input (a command-line argument holds "
                             "at most 128 KiB on Linux; Mamba takes prompts of any length); its bytes as they are, so "
                             "a byte-level model gets exactly them")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    mode.add_argument("--temperature", type=float, metavar="T", help="sample with this temperature (> 0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the nucleus of probability P (default 1.0: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="penalise (R > 1) or favour (R < 1) tokens seen so far, CTRL's rule (default 1.0: off)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampler, with --temperature (default: random)")
    p.add_argument("--stop-ids", type=_ids, default=[], metavar="1,2", help="token ids that end the generation")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="text that ends the generation as soon as it is generated, left out of the output with "
                        "everything after it; repeatable; taken literally (a newline in bash: --stop $'\\n\\n')")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    out.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings)")
    p.add_argument("--logprobs", action="store_true",
                   help="with --json: also each generated token's log-probability under the model (natural log of "
                        "the softmax of its raw logits, before penalty, temperature, top-k and top-p)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider (default auto: CUDA where this onnxruntime has it)")
    p.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--ort-config", type=ort_config_entry, action="append", default=[], metavar="KEY=VALUE",
                   help="an onnxruntime session config entry for both sessions, repeatable, passed through unchecked "
                        "(e.g. session.disable_prepacking=1: the weights stay memory-mapped, one copy for both)")
    p.add_argument("--no-custom-ops", action="store_true", help="run the graphs' function fallbacks, not the library")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")
    p.set_defaults(run=run)


# The runtime's messages start with its parameter names; the command's users know the flags.
_FLAGS = {"max_new_tokens": "--max-new-tokens", "top_k": "--top-k", "top_p": "--top-p",
          "repetition_penalty": "--repetition-penalty", "seed": "--seed", "temperature": "--temperature",
          "threads": "--threads", "stop tokens": "--stop-ids", "stop_tokens": "--stop-ids", "stop strings": "--stop"}
_NAME = re.compile(r"^(max_new_tokens|top_k|top_p|repetition_penalty|seed|temperature|threads|stop[ _]tokens|"
                   r"stop strings|"
                   r"prompt 0|text input)\b")


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with the runtime parameter it starts with replaced by the command's flag."""
    prompt = ("--prompt-file" if args.prompt_file is not None else "--prompt" if args.prompt is not None
              else "--prompt-ids")
    flags = {**_FLAGS, "prompt 0": prompt, "text input": f"{prompt} (text)" if prompt != "--prompt-ids" else prompt}
    message = _NAME.sub(lambda m: flags[m.group(1)], message, count=1)
    return message.replace("give token ids instead", "give --prompt-ids instead").replace(
        "use stop tokens instead", "use --stop-ids instead")


def _sampling(args: argparse.Namespace):
    from mamba_runtime import SamplingConfig

    if args.temperature is None:
        given = [flag for flag, on in (("--top-k", args.top_k), ("--top-p", args.top_p != 1.0),
                                       ("--seed", args.seed is not None)) if on]
        if given:  # they would change nothing in greedy decoding (mamba_generate refuses them likewise)
            raise MambaExportError(f"{'/'.join(given)} {'applies' if len(given) == 1 else 'apply'} to sampling: also "
                                   "give --temperature")
    if args.temperature is not None and not (0 < args.temperature < float("inf")):
        raise MambaExportError(f"--temperature must be a finite number > 0 (--greedy for greedy decoding), found "
                               f"{args.temperature}")
    return SamplingConfig(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _open(args: argparse.Namespace):
    from mamba_runtime import CustomOpsFallbackWarning, MambaRuntime

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CustomOpsFallbackWarning)
        rt = MambaRuntime(args.export_dir, provider=args.provider, threads=args.threads,
                          custom_ops="off" if args.no_custom_ops else "auto", verify=not args.no_verify,
                          ort_config=dict(args.ort_config))
    for w in caught:
        print(f"mamba-export generate: note: {w.message}", file=sys.stderr)
    return rt


def _stream(rt, prompt, args, sampling) -> None:
    if rt.codec is not None:
        for piece in rt.stream_text(prompt, args.max_new_tokens, sampling, args.stop_ids, args.stop):
            print(piece, end="", flush=True)
    else:  # ids as the non-streamed output prints them: comma-separated
        for i, tok in enumerate(rt.stream(prompt, args.max_new_tokens, sampling, args.stop_ids, args.stop)):
            print(f",{tok}" if i else tok, end="", flush=True)
    print()


def run(args: argparse.Namespace) -> int:
    from mamba_runtime import GenerationInputError

    try:
        return _run(args)
    except GenerationInputError as e:
        raise GenerationInputError(_in_flags(str(e), args)) from None


def _read_prompt(path: str) -> str:
    """The text of --prompt-file (``-``: standard input), its bytes kept as they are: UTF-8, and any byte that is not
    as the surrogate Python gives it in a command line (surrogateescape), which a byte-level model encodes back to
    that byte and a tokenizer.json refuses in one line."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise MambaExportError(f"--prompt-file: {path}: cannot read it ({e.strerror or e})") from None
    return data.decode("utf-8", "surrogateescape")


def _run(args: argparse.Namespace) -> int:
    from mamba_runtime.errors import require_int

    if args.prompt_ids == []:
        raise MambaExportError("--prompt-ids is empty: give at least one token id")
    if args.prompt_file is not None:  # read before the export is opened: a wrong path fails at once
        args.prompt = _read_prompt(args.prompt_file)
    require_int(args.max_new_tokens, "--max-new-tokens")  # before the export is opened (and its files hashed)
    if args.threads is not None:
        require_int(args.threads, "--threads")
    if args.logprobs and not args.json:
        raise MambaExportError("--logprobs goes with --json (the log-probabilities are a field of its object)")
    sampling = _sampling(args)
    rt = _open(args)
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    if args.stream:
        _stream(rt, prompt, args, sampling)
        return 0
    result = rt.generate(prompt, args.max_new_tokens, sampling, args.stop_ids, stop_strings=args.stop,
                         logprobs=args.logprobs)
    text = result.texts[0] if result.texts is not None else None
    if args.json:
        print(json.dumps({
            "prompt_tokens": result.prompts[0], "tokens": result.tokens[0], "text": text,
            "finish_reason": result.finish_reasons[0], "timings": result.timings, "provider": rt.device.name,
            "custom_op_library": rt.custom_op_library, "sampling": {**sampling.to_dict(), "seed": result.seed},
            **({"logprobs": result.logprobs[0]} if args.logprobs else {}),
        }))
    else:
        print(text if text is not None else ",".join(map(str, result.tokens[0])))
    return 0
