"""This machine's hardware description without measuring: the cached calibration
(`hf-moe-accel plan --calibrate` writes it), else the preset of this GPU model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
import transformers

from .hardware import GIB, Hardware, hardware_preset, preset_for_gpu_name


def cache_dir() -> Path:
    """$HF_MOE_ACCEL_CACHE, else $XDG_CACHE_HOME/hf_moe_accel, else ~/.cache/hf_moe_accel."""
    if "HF_MOE_ACCEL_CACHE" in os.environ:
        return Path(os.environ["HF_MOE_ACCEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_moe_accel"


def cache_path() -> Path:
    """One file per GPU model, GPU count, torch and transformers version: a change of either re-measures
    (generate()'s host overheads are Transformers' loop, and from 5.18 our graph decode defers its stop
    checks, which hides the host's part behind the replay)."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    versions = f"torch{torch.__version__}-transformers{transformers.__version__}"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{name}-x{count}-{versions}".lower()).strip("-")
    return cache_dir() / f"calibration-{slug}.json"


def load_calibration(path: Path | None = None) -> Hardware | None:
    """The cached calibration of this machine, or None when there is none (or it's unreadable)."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(Hardware)}
        return Hardware(**{k: v for k, v in data["hardware"].items() if k in fields})
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def hardware_of_this_machine() -> Hardware:
    """Without measuring: the cached calibration, else the preset of this GPU, else H100 figures."""
    if not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: pass a stated hardware description (--hardware PRESET or a JSON file)")
    return load_calibration() or uncalibrated_hardware()


def uncalibrated_hardware() -> Hardware:
    """The preset of this GPU model (H100 figures for an unknown one); count and memory from the devices."""
    name = torch.cuda.get_device_name(0)
    base = preset_for_gpu_name(name)
    if base is None:
        base, source = hardware_preset("h100"), f"H100 figures for an unknown GPU {name!r}"
    else:
        source = f"preset {base.name}"
    memory = torch.cuda.get_device_properties(0).total_memory / GIB
    return dataclasses.replace(
        base, gpu_name=name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=memory,
        source=f"{source}, not calibrated (`hf-moe-accel plan --calibrate` measures this machine)",
    )
