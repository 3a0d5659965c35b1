"""Argument types shared by the subcommands of `hf-moe-accel`."""

from __future__ import annotations

import argparse

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
