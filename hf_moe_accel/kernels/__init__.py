"""Fused MoE kernels, each beside its plain-torch reference.

`route` and `fused_experts` pick the Triton kernel for CUDA tensors of a served dtype and the
reference otherwise (CPU, float64, ...). Tests call the `*_triton` functions directly, on CPU
tensors under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch

from .experts_fp8_reference import experts_fp8_reference
from .experts_mxfp4_reference import experts_mxfp4_reference
from .experts_reference import experts_reference
from .routing_reference import route_reference
from .spec import (
    Activation,
    BlockScales,
    ExpertAddresses,
    ExpertWeights,
    MxScales,
    RoutingSpec,
)
from .tuning import KernelPath, address_path, interpreting

SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

__all__ = [
    "SERVED_DTYPES",
    "Activation",
    "BlockScales",
    "ExpertAddresses",
    "ExpertWeights",
    "MxScales",
    "RoutingSpec",
    "address_path",
    "block_scaled_kernels_serve",
    "fused_experts",
    "fused_experts_at",
    "kernels_serve",
    "mxfp4_kernels_serve",
    "route",
]


def kernels_serve(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these tensors (on a GPU, in a served dtype)."""
    return all(t.is_cuda and t.dtype in SERVED_DTYPES for t in tensors)


def block_scaled_kernels_serve(hidden_states: torch.Tensor, weights: ExpertWeights) -> bool:
    """Whether the Triton kernels run for block-scaled weights: activations as `kernels_serve` says,
    weights and scales on the same GPU, and float8 weights only where the GPU converts them in
    hardware (compute capability 8.9 and later: Triton has no float8 loads before that)."""
    tensors = (weights.gate_up, weights.down, weights.scales.gate_up, weights.scales.down)
    if not (kernels_serve(hidden_states) and all(t.device == hidden_states.device for t in tensors)):
        return False
    fp8 = any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in (weights.gate_up, weights.down))
    return not fp8 or torch.cuda.get_device_capability(hidden_states.device) >= (8, 9)


def mxfp4_kernels_serve(hidden_states: torch.Tensor, weights: ExpertWeights) -> bool:
    """Whether the Triton kernels run for MXFP4 weights: activations as `kernels_serve` says, weights and
    scales on the same GPU. The nibbles and scales are decoded with integer and float32 arithmetic that
    every GPU Triton supports, so no capability beyond the bf16 kernels' is needed."""
    tensors = (weights.gate_up, weights.down, weights.mx_scales.gate_up, weights.mx_scales.down)
    return kernels_serve(hidden_states) and all(t.device == hidden_states.device for t in tensors)


def route(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k], expert ids [T, k] int64), as `spec` says."""
    if kernels_serve(logits):
        from .routing import route_triton

        return route_triton(logits, spec, correction_bias)
    return route_reference(logits, spec, correction_bias)


def fused_experts(
    hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]) -> [T, H].

    An id of -1 means "no expert": the pair adds nothing, its weight is ignored, and no work is
    done for it (a token whose ids are all -1 gets zeros). Variable expert counts per token are
    written this way, so that shapes stay static (CUDA graphs).

    Block-scaled (FP8) weights (`weights.scales`) are read as stored and dequantized in the kernels;
    the result is in hidden_states' dtype, as `experts_fp8_reference` (the path off the GPU) computes it.
    """
    if weights.mx_scales is not None:
        if mxfp4_kernels_serve(hidden_states, weights):
            from .experts_triton import fused_experts_triton

            return fused_experts_triton(hidden_states, weights, topk_ids, topk_weights)
        return experts_mxfp4_reference(hidden_states, weights, topk_ids, topk_weights)
    if weights.scales is not None:
        if block_scaled_kernels_serve(hidden_states, weights):
            from .experts_triton import fused_experts_triton

            return fused_experts_triton(hidden_states, weights, topk_ids, topk_weights)
        return experts_fp8_reference(hidden_states, weights, topk_ids, topk_weights)
    if kernels_serve(hidden_states, weights.gate_up, weights.down):
        from .experts_triton import fused_experts_triton

        return fused_experts_triton(hidden_states, weights, topk_ids, topk_weights)
    return experts_reference(hidden_states, weights, topk_ids, topk_weights)


def fused_experts_at(
    hidden_states: torch.Tensor, layout: ExpertWeights, addresses: ExpertAddresses, topk_ids: torch.Tensor,
    topk_weights: torch.Tensor, path: KernelPath | None = None,
) -> torch.Tensor:
    """`fused_experts` with expert e's weights read at `addresses` (GPU memory or pinned host memory,
    zero-copy), in the per-expert layout of `layout`'s tensors; no biases. Ids as in `fused_experts`.
    Block-scaled (FP8) weights read each expert's scales at the scale addresses of `addresses`.
    `path`: default `address_path(tokens)`. Triton only: CUDA tensors, or CPU tensors under Triton's
    interpreter (tests)."""
    if layout.scales is None:
        served = kernels_serve(hidden_states, layout.gate_up, layout.down)
    else:
        if addresses.gate_up_scale is None or addresses.down_scale is None:
            raise ValueError("experts by address with block-scaled (FP8) weights need their scales' addresses "
                             "(ExpertAddresses.gate_up_scale and .down_scale)")
        served = block_scaled_kernels_serve(hidden_states, layout)
    if not (served or interpreting()):
        raise ValueError("experts by address run in the Triton kernels: CUDA tensors of a served dtype "
                         "(float8 weights: compute capability 8.9 or later)")
    from .experts_triton import fused_experts_at_triton

    path = path or address_path(hidden_states.shape[0])
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be 'decode' or 'prefill' (or None: address_path decides), got {path!r}")
    return fused_experts_at_triton(hidden_states, layout, addresses, topk_ids, topk_weights, path)
