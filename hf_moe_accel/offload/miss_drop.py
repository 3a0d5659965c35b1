"""Miss-aware top-k (`OffloadOptions(miss_drop_threshold=...)`): per token, a chosen expert that is a
miss (in no GPU slot) and whose normalised routing weight is under the threshold is dropped for that
token, so the tokens that need a missed expert most still get it. Lossy; off by default.

The rule is `expert_threshold`'s (`RoutingSpec.expert_threshold`), applied to missed experts only: the
normalised weight is w_i / sum_j w_j over the token's chosen experts, the token's largest is always
kept (the first on a tie), and the kept weights are renormalised the way the family's router does.
The routing arrives final (renormalised, scaled): every family's renormalisation and scaling multiply
a token's weights by one factor, so the normalised weights read the same from it, and a family that
renormalises (by the kept weights' sum, or a softmax over the kept logits) gives each kept expert its
share of the token's total weight, which here is scaling the kept weights back up to the token's
total before the drop; a family that doesn't renormalise keeps them as they are.

Everything runs in tensor ops without a host sync, so the zero-copy decode path (and its CUDA graphs)
applies it on the device, where the cache's lookup table says which experts are cached.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..kernels.routing_reference import drop_under_threshold
from ..kernels.spec import RoutingSpec
from ..patches.router import router_specs
from ..quality.selection import moe_layers


def check_miss_drop_threshold(threshold: object) -> None:
    """None (off) or a number in [0, 1) (a fraction of the token's routing weight)."""
    if threshold is None:
        return
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise TypeError(f"miss_drop_threshold must be None or a number in [0, 1), got {threshold!r}")
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"miss_drop_threshold must be in [0, 1) (a fraction of the token's routing weight), got {threshold!r}")


def renormalises(spec: RoutingSpec) -> bool:
    """Whether the family rescales the experts a threshold keeps (`RoutingSpec.expert_threshold`): by
    their sum when it renormalises, by a softmax over the kept logits for "softmax_topk_logits"."""
    return spec.renormalize or spec.scoring == "softmax_topk_logits"


def renormalisation_by_block(model: nn.Module) -> dict[str, bool]:
    """For each MoE block (its module name): whether its router renormalises kept experts. Raises
    ValueError for a block whose router kept its stock forward (its rule isn't one we know)."""
    rules = {}
    for name, router in moe_layers(model):
        specs = [] if router is None else router_specs(router)
        if not specs:
            raise ValueError(f"miss_drop_threshold needs fused routers, but the router of {name} keeps its stock "
                             "forward (a routing rule the kernels don't compute)")
        rules[name] = renormalises(specs[0])
    return rules


def drop_missed(ids: torch.Tensor, weights: torch.Tensor, missed: torch.Tensor, threshold: float,
                renormalise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] (-1: no expert), weights [T, k], missed [T, k] bool (the pair's expert is in no slot)
    -> (ids with the dropped pairs at -1, weights, dropped [T, k] bool). Tokens with nothing dropped
    keep their weights bit for bit; the others' are computed in float32 and cast back."""
    w = weights.float().masked_fill(ids < 0, 0.0)
    below = drop_under_threshold(w, ids, threshold)[1] < 0
    dropped = below & missed & (ids >= 0)
    kept = w.masked_fill(dropped, 0.0)
    if renormalise:
        total, kept_total = w.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
        kept = kept * (total / kept_total.clamp_min(torch.finfo(torch.float32).tiny))
    changed = dropped.any(dim=-1, keepdim=True)
    new_weights = torch.where(changed, kept.to(weights.dtype), weights)
    return ids.masked_fill(dropped, -1), new_weights, dropped
