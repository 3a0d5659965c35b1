"""Programmatic dependent launch (PDL) for the decode kernels, on Hopper and later GPUs.

A decode step is a chain of kernels of a few microseconds each; between two of them the GPU drains
the first, then launches the second and ramps it up. Launched with PDL, the next kernel of the chain
is let onto the GPU while the current one runs (once all of the current kernel's programs have
started, `gdc_launch_dependents`), and its programs wait (`gdc_wait`) until the current kernel has
finished and its writes are visible. CUDA graphs keep the launch attribute as a programmatic edge, so
replays overlap the same way.

The rule for a kernel launched this way (`USE_PDL`): every program calls `gdc_wait` before its first
load or store of anything an earlier kernel may write or read (inputs, outputs, buffers the caching
allocator hands out again), and before it exits. A program that exits early must wait too: else the
kernel could finish before its predecessor, and its successor's wait, which covers only the kernel
just before it, would not cover the predecessor. `prologue` does both calls; a kernel calls it first,
or after loads of what no kernel of a decode step writes (weights: `decode_linear`), which then
stream in while the previous kernel finishes.

Off under Triton's interpreter, on CPU tensors, before compute capability 9.0, with a Triton without
`launch_pdl`, or with HF_MOE_ACCEL_PDL=0 (or false/off/no) in the environment (A/B runs).

With `compile_decode`, inductor's own kernels sit between ours in the step: they launch with PDL too
(inductor's `triton.enable_pdl`, passed to our compile only; stock's compiles are untouched), else a
process that has captured any other CUDA graph loses most of PDL's overlap (measured with
`python scripts/replay_state_probe.py`; figures in docs/BENCHMARKS.md).
HF_MOE_ACCEL_INDUCTOR_PDL=0 turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from .tuning import interpreting

ENV_SWITCH = "HF_MOE_ACCEL_PDL"
INDUCTOR_SWITCH = "HF_MOE_ACCEL_INDUCTOR_PDL"
_OFF_VALUES = frozenset({"0", "false", "off", "no"})
_ON_VALUES = frozenset({"", "1", "true", "on", "yes"})


def switch_off_reason(name: str) -> str | None:
    """Why the environment switch `name` turns its feature off ("off (NAME=value)"), or None where it is on.

    Unset or empty, 1/true/on/yes: on; 0/false/off/no: off (any case). Any other value raises, so that a
    typo does not leave an A/B run measuring the wrong side.
    """
    value = os.environ.get(name)
    setting = "" if value is None else value.strip().lower()
    if setting in _ON_VALUES:
        return None
    if setting in _OFF_VALUES:
        return f"off ({name}={value})"
    raise ValueError(f"{name}={value!r}: set 0, false, off or no to turn it off; 1, true, on or yes (or unset) for on")


@functools.lru_cache(maxsize=1)
def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = {field.name for field in dataclasses.fields(CUDAOptions)}
    return "launch_pdl" in fields and hasattr(tl.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=16)
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_off_reason(device: torch.device) -> str | None:
    """Why kernels on `device` launch without PDL, or None when they launch with it."""
    reason = switch_off_reason(ENV_SWITCH)
    if reason is not None:
        return reason
    if device.type != "cuda" or interpreting():
        return "off (not a CUDA launch)"
    if not _triton_has_pdl():
        return "off (this Triton has no launch_pdl)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not _device_has_pdl(index):
        return "off (needs compute capability 9.0 or later)"
    return None


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (see the module docstring)."""
    return pdl_off_reason(device) is None


def pdl_launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel with a `USE_PDL` constexpr: PDL on where `pdl_enabled`."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}


def inductor_pdl_off_reason(device: torch.device) -> str | None:
    """Why a compiled decode step's inductor kernels launch without PDL, or None when they launch with it."""
    reason = switch_off_reason(INDUCTOR_SWITCH) or pdl_off_reason(device)
    if reason is not None:
        return reason
    import torch._inductor.config as inductor_config  # imported late: inductor is heavy and only compile_decode needs it

    if not hasattr(inductor_config.triton, "enable_pdl"):
        return "off (this torch's inductor has no triton.enable_pdl)"
    return None


def inductor_compile_options(device: torch.device) -> dict:
    """torch.compile options (inductor) for a decode step on `device`: its kernels with PDL where
    `inductor_pdl_off_reason` says on; none otherwise."""
    return {"triton.enable_pdl": True} if inductor_pdl_off_reason(device) is None else {}


@triton.jit
def prologue(USE_PDL: tl.constexpr):
    """Wait for the previous kernel (its writes visible), then let the next one launch (PDL only)."""
    if USE_PDL:  # a constexpr branch: never compiled where PDL is off (nor on a Triton without gdc)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
