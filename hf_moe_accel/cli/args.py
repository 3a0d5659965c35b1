"""Argument types and output files shared by the subcommands of `hf-moe-accel`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("1,8,32")."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def write_outputs(args: argparse.Namespace, results, plot: Callable[[object, str], None]) -> None:
    """The `--json FILE` and `--plot FILE.png` a subcommand was asked for, each said when written."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
