"""The `hf-moe-accel` command line: bench, generate, eval, plan, env."""

from .main import main

__all__ = ["main"]
