"""Transformers' fine-grained FP8 experts (`FP8Experts`), described for the fused kernels.

Transformers' FineGrainedFP8 quantizer replaces each experts module by an `FP8Experts` decorated with
`use_experts_implementation(..., experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)`: float8_e4m3fn
gate_up_proj [E, 2I, H] and down_proj [E, H, I] (gate then up, not transposed, no bias), float32
`*_scale_inv` per `block_size` block, and a `_apply_gate` of its own. `layout_problem` says what the
kernels can't read (the registry refuses those modules before anything changes, naming the fix);
`activation` is that `_apply_gate` as an Activation.

Compute: weight-only FP8. Activations stay in their dtype, as in `kernels.experts_fp8_reference`;
Transformers' FP8 matmul also quantizes them per (token, 128 columns), its dynamic activation scheme.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.experts_fp8_reference import FP8_DTYPE
from ..kernels.spec import Activation, is_experts_module
from .experts import (
    activation_from_act_fn,
    dispatch_interface,
    fp8_experts_interface,
    gate_up_name,
)

# What to do with a checkpoint whose FP8 layout the kernels don't read.
LAYOUT_FIX = (
    "The fused kernels read float8_e4m3fn expert weights with float32 block scales (FineGrainedFP8Config's "
    "default layout, e.g. weight_block_size=(128, 128)). To accelerate this model, load it dequantized "
    "(from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True))) and pass "
    "accelerate(model, expert_dtype='fp8') to requantize its experts in that layout, or run it stock"
)


def is_fp8_experts(module: nn.Module) -> bool:
    """Whether `module` dispatches through Transformers' FP8 experts interface."""
    interface = fp8_experts_interface()
    return interface is not None and dispatch_interface(module) is interface


def has_fp8_experts(model: nn.Module) -> bool:
    """Whether any experts module of `model` is Transformers' FP8 experts or holds float8 weights."""
    return any(is_experts_module(m) and (is_fp8_experts(m) or _float8(getattr(m, "down_proj", None))) for m in model.modules())


def layout_problem(experts: nn.Module) -> str | None:
    """What of this FP8Experts' layout the fused kernels can't read, or None."""
    gate_up, down = getattr(experts, gate_up_name(experts)), experts.down_proj
    if gate_up.dtype == torch.int8 or down.dtype == torch.int8:
        return "its weights are FP4-packed (int8, expert_dtype='fp4')"
    stored = {gate_up.dtype, down.dtype}
    if not any(map(_float8, (gate_up, down))):
        return None  # left unquantized by the quantizer (sizes not multiples of the block): plain weights
    if stored != {FP8_DTYPE}:
        return f"its gate_up and down are {gate_up.dtype} and {down.dtype}; the kernels take both in {FP8_DTYPE} or neither"
    block = getattr(experts, "block_size", None)
    if block is None:
        return "its weights have per-tensor scales (weight_block_size=None)"
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        return f"its block_size is {block!r}, not two positive ints"
    for name in (gate_up_name(experts), "down_proj"):
        scale = getattr(experts, f"{name}_scale_inv", None)
        if not isinstance(scale, torch.Tensor):
            return f"it has no {name}_scale_inv"
        if scale.dtype != torch.float32:
            return f"its {name}_scale_inv is {scale.dtype} (e.g. UE8M0 power-of-two scales); only float32 scales are read"
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        return f"activation_scheme={experts.activation_scheme!r}: static activation scales the kernels don't apply"
    if experts.has_bias or experts.is_transposed or not experts.is_concatenated:
        return "its layout flags are not FP8Experts' (no bias, not transposed, gate and up concatenated)"
    return None


def activation(experts: nn.Module) -> Activation | None:
    """FP8Experts' `_apply_gate` (or `act_fn` without a gate) as an Activation; None where the kernels
    have no such activation. The branches follow `_apply_gate` in Transformers 5.17 to 5.25: a softcapped
    SwiGLU (mlp_gate_softcap), GPT-OSS's SwiGLU (swiglu_alpha, clipped at the limit), the activated gate
    clipped after the activation (limit_after_act), gate and up clipped before it (a limit), else
    act_fn(gate) * up."""
    plain = activation_from_act_fn(experts)
    if not experts.has_gate:
        return plain
    if getattr(experts, "gate_softcap", None) is not None:
        return None
    limit = getattr(experts, "limit", None)
    if getattr(experts, "swiglu_alpha", None) is not None:
        return None if limit is None else Activation("swiglu_oai", alpha=float(experts.swiglu_alpha), limit=float(limit))
    if limit is None:
        return plain
    if plain != Activation("silu"):
        return None  # the clipped SwiGLUs of the kernels apply SiLU
    kind = "swiglu_post_clamped" if getattr(experts, "limit_after_act", False) else "swiglu_clamped"
    return Activation(kind, limit=float(limit))


def _float8(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
