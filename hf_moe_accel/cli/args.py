"""Argument types, the parser class and output files shared by the subcommands of `hf-moe-accel`.

Every numeric flag has a type that states its valid range, so a value out of range is refused
while the arguments are parsed, before any model is built or loaded, with the range in the
message; a value that argparse accepts is one the command runs with (no silent fallback to a
default). Output files are checked before the run too (`check_output_paths`), so that a typo in
`--json` costs a second, not a whole benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..patches.expert_dtype import EXPERT_DTYPES
from .checkpoint import CliError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The flags that name a file a command writes: Namespace attribute -> flag.
OUTPUT_FLAGS = {"json": "--json", "plot": "--plot"}


class Parser(argparse.ArgumentParser):
    """argparse's parser with its refusals on one line (the message and where the help is), as every
    other bad input of the command line is; subparsers take this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("1,8,32")."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers (1 or more), got {text!r}")
    return values


def at_least(low: int, why: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= `low`; `why` says what the bound is for."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{f' ({why})' if why else ''}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def list_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """argparse type: comma-separated values ("128,2048,8192"), each checked by the type `item` (e.g.
    `at_least(1)`), whose message names a value out of range; one value is a list of one. An empty
    entry and a value given twice are refused (a repeated run is time spent on nothing)."""

    def parse(text: str) -> list:
        entries = [entry.strip() for entry in text.split(",")]
        if not all(entries):
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each an {item.__name__}, got {text!r}")
        values = [item(entry) for entry in entries]
        if repeated := sorted({v for v in values if values.count(v) > 1}):
            raise argparse.ArgumentTypeError(f"each value once, got {', '.join(map(str, repeated))} more than once in {text!r}")
        return values

    parse.__name__ = f"comma-separated list, each an {item.__name__}"
    return parse


def in_range(low: float, high: float, *, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a number in [low, high] (or [low, high) with `high_open`)."""
    bounds = f"[{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text}")
        return value

    parse.__name__ = f"number in {bounds}"
    return parse


def add_expert_dtype(parser: argparse.ArgumentParser, help: str) -> None:
    """`--expert-dtype`: accelerate()'s expert_dtype, its valid values `patches.expert_dtype.EXPERT_DTYPES`."""
    parser.add_argument("--expert-dtype", choices=EXPERT_DTYPES, help=help)


def non_empty(text: str) -> str:
    """argparse type: text with at least one character (a prompt: the model continues it)."""
    if not text:
        raise argparse.ArgumentTypeError("empty text; give at least one character for the model to continue")
    return text


def check_output_path(path: str, flag: str) -> None:
    """Refuse an output file that can't be written (CliError naming the flag and the path): its folder
    must exist and be writable, and the path must not be a folder."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise CliError(f"{flag} {path} is a folder; give a file name in it")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "doesn't exist"
        raise CliError(f"{flag} {path}: the folder {folder} {what}; create it first or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CliError(f"{flag} {path}: no permission to write there; pick a path you can write")


def check_output_paths(args: argparse.Namespace) -> None:
    """Each output file a command was asked for can be written (and `--plot` has matplotlib): checked
    before the run, which can take minutes."""
    for attribute, flag in OUTPUT_FLAGS.items():
        path = getattr(args, attribute, None)
        if path:
            check_output_path(path, flag)
    if getattr(args, "plot", None):
        from ..bench.plotting import pyplot

        try:
            pyplot()
        except ImportError as error:
            raise CliError(str(error)) from None


def write_outputs(args: argparse.Namespace, results, plot: Callable[[object, str], None]) -> None:
    """The `--json FILE` and `--plot FILE.png` a subcommand was asked for, each said when written."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
