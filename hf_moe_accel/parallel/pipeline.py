"""Pipeline over several GPUs in one process: accelerate's balanced device map and dispatch hooks.

Consecutive decoder layers go to consecutive GPUs (a layer is never split); accelerate's hooks move
the hidden states across. Each dispatched module also makes its GPU the current CUDA device before
it runs, so the Triton kernels inside launch on the GPU that holds their tensors.
"""

from __future__ import annotations

import logging

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

from ..offload.host_weights import remove_hook_keeping_class_forward
from .distributed import UndoLog, single_device

logger = logging.getLogger("hf_moe_accel")


def pipeline_device_map(model: nn.Module, weight_budget_bytes: dict[int, int]) -> dict[str, int]:
    """Module name -> GPU index, layers balanced by memory within each GPU's weight budget.

    ValueError when the weights don't fit in the budgets (accelerate would spill to CPU or disk).
    """
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    balanced = get_balanced_memory(model, max_memory=dict(weight_budget_bytes), no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    spilled = sorted({str(d) for d in device_map.values() if d not in weight_budget_bytes})
    if spilled:
        # The balanced budgets leave slack for the first GPU's activations; retry with the whole budgets.
        device_map = infer_auto_device_map(model, max_memory=dict(weight_budget_bytes), no_split_module_classes=no_split, dtype=dtype)
        spilled = sorted({str(d) for d in device_map.values() if d not in weight_budget_bytes})
    if spilled:
        total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        budgets = ", ".join(f"GPU {d}: {b / 2**30:.1f} GiB" for d, b in weight_budget_bytes.items())
        raise ValueError(f"the model's {total:.1f} GiB of weights don't fit in the pipeline's GPUs ({budgets})")
    return device_map


def _set_current_device(index: int):
    def hook(module: nn.Module, args) -> None:
        torch.cuda.set_device(index)

    return hook


def apply_pipeline(model: nn.Module, device_map: dict[str, int]) -> UndoLog:
    """Dispatch `model` over the GPUs of `device_map`; the undo log takes the hooks off and moves it home."""
    home = single_device(model)
    previous_map = model.__dict__.get("hf_device_map")
    undo = UndoLog()

    def restore() -> None:
        for module in model.modules():
            remove_hook_keeping_class_forward(module)
        model.to(home)
        if previous_map is None:
            model.__dict__.pop("hf_device_map", None)
        else:
            model.hf_device_map = previous_map

    undo.push(restore)
    try:
        dispatch_model(model, device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None))
        for name, index in device_map.items():
            module = model.get_submodule(name)
            undo.push(module.register_forward_pre_hook(_set_current_device(index)).remove)
    except BaseException:
        undo.undo()
        raise
    logger.info("hf_moe_accel: pipeline over GPUs %s", sorted(set(device_map.values())))
    return undo
