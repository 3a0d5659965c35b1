"""`accelerate(model, expert_dtype="fp8")`: experts quantized once, at patch time, to block-scaled e4m3.

The layout is Transformers' fine-grained FP8 one (`kernels.experts_fp8_reference.quantize_blocks`:
float8_e4m3fn weights, one float32 scale_inv per 128 x 128 block of the stored matrix), so the kernels
serve these experts as they serve the FP8Experts of a quantized checkpoint. Each quantized projection's
parameter is replaced by a float8_e4m3fn one, with a `<name>_scale_inv` parameter beside it
(Transformers' naming, which `experts.block_scales` reads); biases stay as they are; the module keeps
its class and its dispatch.

Rules:
- Originals. From quantization until accelerate() returns, the original parameters are held, their data
  in host memory (moved there when on a GPU, so the GPU holds one layer's transient at a time), so that
  a failing accelerate() puts them back. Then `keep_original_experts=True` keeps them for unpatch(),
  which puts the same parameter objects back, bitwise, on the device of the quantized ones; otherwise
  they are released and unpatch() refuses: it would leave a silently quantized model.
- Only our implementation runs them: the stock experts implementations can't read float8 weights in
  this class, so a forward in training mode or under another experts implementation name raises (a
  forward pre-hook) saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..kernels.experts_fp8_reference import FP8_DTYPE, quantize_blocks
from .experts import EXPERTS_IMPLEMENTATION, gate_up_name

ExpertDtype = Literal["fp8"]
EXPERT_DTYPES: tuple[str, ...] = ("fp8",)
BLOCK_SIZE = (128, 128)  # Transformers' FineGrainedFP8Config default weight_block_size
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Float32 working copy of the experts quantized at once: bounds the transient memory on a GPU.
_CHUNK_BYTES = 256 * 2**20
RELOAD_HINT = ("reload the model (from_pretrained) to get the original experts; accelerate(model, expert_dtype='fp8', "
               "keep_original_experts=True) keeps a host copy of them that unpatch() restores")


def check_expert_dtype(expert_dtype: object, keep_original_experts: object) -> None:
    """Refuse bad values before anything changes: TypeError for a wrong type, ValueError for a wrong value."""
    valid = ", ".join(map(repr, EXPERT_DTYPES))
    if isinstance(expert_dtype, str):
        if expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"accelerate(): expert_dtype must be one of {valid} or None (the checkpoint's dtype), "
                             f"got {expert_dtype!r}")
    elif expert_dtype is not None:
        raise TypeError(f"accelerate(): expert_dtype must be one of {valid} or None (the checkpoint's dtype), got "
                        f"{expert_dtype!r} ({type(expert_dtype).__name__})")
    if not isinstance(keep_original_experts, bool):
        raise TypeError(f"accelerate(): keep_original_experts must be True or False, got {keep_original_experts!r} "
                        f"({type(keep_original_experts).__name__})")
    if keep_original_experts and expert_dtype is None:
        raise ValueError("accelerate(): keep_original_experts keeps the experts that expert_dtype quantizes; "
                         "pass expert_dtype='fp8' with it, or leave it False")


def needs_quantizing(experts: nn.Module) -> bool:
    """Whether `expert_dtype="fp8"` quantizes this module: weights not already float8."""
    return experts.down_proj.dtype != FP8_DTYPE


def quantize_problem(experts: nn.Module) -> str | None:
    """Why this module's weights can't be quantized at patch time, or None."""
    for name in (gate_up_name(experts), "down_proj"):
        weight = getattr(experts, name)
        if weight.device.type == "meta":
            return f"its {name} is on the meta device (offloaded by a device map); load the model onto a device first"
        if weight.dtype not in QUANTIZABLE_DTYPES:
            return f"its {name} is {weight.dtype}; expert_dtype='fp8' quantizes bfloat16, float16 or float32 weights"
    return None


@dataclass(eq=False)
class QuantizedExperts:
    """What expert_dtype changed on one experts module, and how to undo it."""

    names: tuple[str, ...]  # the quantized parameters, each with a "<name>_scale_inv" beside it
    block_size: tuple[int, int]
    keep: bool  # keep_original_experts: the originals outlive accelerate()
    originals: dict[str, nn.Parameter] | None  # data in host memory; None once released

    @property
    def restorable(self) -> bool:
        return self.originals is not None


def quantize_experts(experts: nn.Module, keep: bool, block_size: tuple[int, int] = BLOCK_SIZE) -> QuantizedExperts:
    """Replace the module's two projections by block-quantized ones (on their device); all or nothing."""
    names = (gate_up_name(experts), "down_proj")
    originals: dict[str, nn.Parameter] = {}
    try:
        for name in names:
            original = experts._parameters[name]
            stored, scale_inv = _quantize(original.detach(), block_size)
            if original.device.type != "cpu":
                original.data = original.data.to("cpu")  # the device copy goes once the module lets go of it
            originals[name] = original
            experts._parameters[name] = nn.Parameter(stored, requires_grad=False)
            experts.register_parameter(f"{name}_scale_inv", nn.Parameter(scale_inv, requires_grad=False))
    except BaseException:
        _put_back(experts, originals)
        raise
    experts.register_forward_pre_hook(refuse_other_forwards)
    return QuantizedExperts(names, tuple(block_size), keep, originals)


def restore_experts(experts: nn.Module, record: QuantizedExperts) -> None:
    """The original parameters back (bitwise, on the quantized ones' device); RuntimeError once released."""
    if record.originals is None:
        raise RuntimeError(f"{type(experts).__name__}'s original experts were released after quantization; {RELOAD_HINT}")
    _put_back(experts, record.originals)
    for key, hook in list(experts._forward_pre_hooks.items()):
        if hook is refuse_other_forwards:
            del experts._forward_pre_hooks[key]


def release_originals(record: QuantizedExperts) -> None:
    """Drop the originals unless the user asked to keep them (their memory goes with the last reference)."""
    if not record.keep:
        record.originals = None


def refuse_other_forwards(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of quantized experts: only our implementation, in eval mode, reads their weights."""
    name = module.config._experts_implementation
    if name == EXPERTS_IMPLEMENTATION and not module.training:
        return
    why = "in training mode (the fused kernels have no backward)" if module.training else f"under experts implementation {name!r}"
    raise RuntimeError(
        f"{type(module).__name__}'s weights were quantized to FP8 by accelerate(expert_dtype='fp8'), which only the "
        f"{EXPERTS_IMPLEMENTATION!r} experts implementation runs, in eval mode; it was called {why}. Set the "
        f"implementation back and call eval(), or unpatch(model) for the original experts (kept with "
        f"keep_original_experts=True; else reload the model)"
    )


def _put_back(experts: nn.Module, originals: dict[str, nn.Parameter]) -> None:
    for name, original in originals.items():
        device = experts._parameters[name].device
        if original.device != device:
            original.data = original.data.to(device)
        experts._parameters[name] = original
        experts._parameters.pop(f"{name}_scale_inv", None)


def _quantize(weight: torch.Tensor, block_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blocks` over [E, R, C], a few experts at a time so that its float32 working copy stays small."""
    if weight.shape[0] == 0:
        return quantize_blocks(weight, block_size)
    per_expert = max(1, weight[0].numel() * 4 * 2)  # the float32 copy and its scaled tiles
    chunk = max(1, _CHUNK_BYTES // per_expert)
    stored = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    scales = []
    for start in range(0, weight.shape[0], chunk):
        part, scale_inv = quantize_blocks(weight[start : start + chunk], block_size)
        stored[start : start + chunk].copy_(part)
        scales.append(scale_inv)
    return stored, torch.cat(scales) if len(scales) > 1 else scales[0]
