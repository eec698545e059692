"""``mamba-export train --data TEXT --preset NAME -o CHECKPOINT_DIR``: train a Mamba-1 language model from scratch."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..training.presets import PRESETS

    p = sub.add_parser(
        "train",
        help="train a Mamba-1 language model on a text file",
        description="Train a byte-level (or tokenizer-based) Mamba-1 model with AdamW, warm-up and cosine decay, "
        "evaluating bits per byte on the held-out end of the text. Writes a checkpoint directory in the "
        "state-spaces/mamba layout plus train_state.pt (for --resume), train_log.jsonl, loss_curve.png and "
        "training.json. Ctrl-C or SIGTERM saves after the current step and exits with 130 or 143; --resume "
        "continues. Progress goes to stderr, the JSON result to stdout. See docs/training.md.",
    )
    p.add_argument("--data", required=True, metavar="TEXT_FILE", help="the training text (its last 5%% is held out)")
    p.add_argument("--preset", metavar="NAME",
                   help=f"model shape and hyper-parameters: {', '.join(PRESETS)} (required unless --resume)")
    p.add_argument("-o", "--output", required=True, metavar="CHECKPOINT_DIR", help="directory to write")
    p.add_argument("--steps", type=int, help="total optimiser steps (default: the preset's)")
    p.add_argument("--until", type=int, metavar="STEP", help="save and stop after this step; --resume continues")
    p.add_argument("--resume", action="store_true",
                   help="continue the run stored in CHECKPOINT_DIR exactly (with its own tokenizer)")
    p.add_argument("--force", action="store_true", help="replace an existing CHECKPOINT_DIR")
    p.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="a tokenizers tokenizer.json (default: bytes)")
    p.add_argument("--backend",
                   help="operator backend: fast (plain PyTorch with a linear-time scan backward), reference, triton "
                   "or auto (default fast; on --resume the run's own)")
    p.add_argument("--device", help="cpu, cuda or auto (default auto: cuda when available; on --resume the run's "
                   "own)")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each training step as one CUDA graph replay (the same arithmetic without the host's "
                   "per-step overhead): auto (default) does on CUDA and falls back to eager steps, with a warning, "
                   "if the step cannot be captured; on makes that an error; off never")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Training allocates tensors of tens of MB every step; on fresh pages they cost several times the arithmetic on
    # them unless backed by transparent huge pages (PyTorch reads this at its first CPU allocation).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch

    from ..errors import MambaExportError
    from ..training.loop import TrainOptions, train

    if args.threads is not None:
        if args.threads < 1:
            raise MambaExportError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    opts = TrainOptions(
        data=args.data, out=args.output, preset=args.preset, steps=args.steps, until=args.until, resume=args.resume,
        force=args.force, tokenizer=args.tokenizer, backend=args.backend, device=args.device,
        cuda_graph=args.cuda_graph, progress=not args.no_progress,
    )
    _, summary = train(opts)
    final = summary["final_heldout_bpb"]
    print(json.dumps({"output": args.output, "steps_done": summary["steps_done"], "wall_s": summary["wall_s"],
                      "final_heldout_bpb": final, "last_eval": summary["last_eval"]}))
    return 0
