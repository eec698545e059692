"""``mamba-export inspect CHECKPOINT_DIR``: import a checkpoint, validate it strictly and describe it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="validate a checkpoint directory and print its configuration",
        description="Import a checkpoint (state-spaces/mamba or transformers layout), check every key and shape "
        "against its config.json, and print the resolved configuration.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="directory with config.json and the weights")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint, read_config

    _, layout, _ = read_config(args.checkpoint)
    model = load_checkpoint(args.checkpoint)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    info = {
        "layout": layout,
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "parameters": n_params,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"layout: {info['layout']}\ndtype: {info['dtype']}\nparameters: {n_params:,}")
        for k, v in info["config"].items():
            print(f"  {k}: {v}")
    return 0
