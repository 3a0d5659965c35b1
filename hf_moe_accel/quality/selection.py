"""Fewer activated experts: the `top_k` and `expert_threshold` options of `accelerate()`.

Both act in the fused routers, so the experts kernels get less work, never masked work: a static
top-k launches everything with k = K, and the threshold writes each dropped expert as id -1, which
the kernels skip. Nothing here syncs with the host at run time; the expert counts per token vary
while every shape stays static (CUDA graphs).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import nn

from ..patches.experts import experts_state
from ..patches.router import is_fused_router, select_experts

TopK = int | Sequence[int]


def check_expert_selection(top_k: TopK | None, expert_threshold: float | None) -> None:
    """Reject option values that are wrong for any model (TypeError/ValueError); the upper bound of
    top_k (the number of experts) is checked against the model by `apply_expert_selection`."""
    if top_k is not None:
        values = [top_k] if not isinstance(top_k, Sequence) or isinstance(top_k, str) else list(top_k)
        if not values or not all(_is_int(k) for k in values):
            raise TypeError(f"top_k must be an int or a sequence of ints (one per MoE layer), got {top_k!r}")
        if min(values) < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k!r}")
    if expert_threshold is not None:
        if not isinstance(expert_threshold, numbers.Real) or isinstance(expert_threshold, bool):
            raise TypeError(f"expert_threshold must be a number in [0, 1), got {expert_threshold!r}")
        if not 0.0 <= float(expert_threshold) < 1.0:
            raise ValueError(
                f"expert_threshold must be in [0, 1) (a fraction of the token's routing weight), got {expert_threshold!r}"
            )


def apply_expert_selection(model: nn.Module, top_k: TopK | None, expert_threshold: float | None) -> None:
    """Route every MoE layer of an accelerated `model` to `top_k` experts (an int, or one per MoE
    layer in module order; None: the model's own) and drop, per token, the experts whose normalised
    routing weight is under `expert_threshold` (None or 0: none). Changes nothing when both are None.

    Raises ValueError, changing nothing, when a top-k is above a layer's number of experts (or its
    group-limited routing's eligible experts), when the list's length isn't the number of MoE layers,
    or when a layer's router kept its stock forward (its routing rule isn't one the kernels compute,
    so fewer experts can't be applied to it).
    """
    check_expert_selection(top_k, expert_threshold)
    if top_k is None and expert_threshold is None:
        return
    layers = moe_layers(model)
    stock = [name for name, router in layers if router is None]
    if stock:
        raise ValueError(
            f"top_k/expert_threshold need fused routers, but the router of {', '.join(stock)} keeps its stock "
            "forward (a routing rule the kernels don't compute)"
        )
    if isinstance(top_k, Sequence):
        if len(top_k) != len(layers):
            raise ValueError(
                f"top_k has {len(top_k)} values but the model has {len(layers)} MoE layers (give one per layer, or an int)"
            )
        top_ks = [int(k) for k in top_k]
    else:
        top_ks = [None if top_k is None else int(top_k)] * len(layers)
    select_experts([router for _, router in layers], top_ks, float(expert_threshold or 0.0))


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """(block name, fused router or None) for each accelerated MoE block of `model`, in module order."""
    layers = []
    for name, block in model.named_modules():
        children = list(block.children())
        if any(experts_state(child) is not None for child in children):
            layers.append((name, next((child for child in children if is_fused_router(child)), None)))
    return layers


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
