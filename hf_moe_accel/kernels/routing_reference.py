"""Plain-torch routing: the CPU path and the oracle for the Triton routing kernel."""

from __future__ import annotations

import torch

from .spec import RoutingSpec


def route_reference(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] and expert ids [T, k] (int64) from router logits [T, E]."""
    if spec.scoring == "softmax_topk_logits":
        top_logits, ids = torch.topk(logits, spec.top_k, dim=-1)
        weights = torch.softmax(top_logits.float(), dim=-1)
    else:
        probs = torch.softmax(logits.float(), dim=-1) if spec.scoring == "softmax" else logits.float().sigmoid()
        choice = probs + correction_bias.float() if spec.has_correction_bias else probs
        if spec.n_group > 1:
            choice = _mask_to_best_groups(choice, spec)
        ids = torch.topk(choice, spec.top_k, dim=-1).indices
        weights = probs.gather(1, ids)
    if spec.expert_threshold > 0:
        weights, ids = drop_under_threshold(weights, ids, spec.expert_threshold)
        if spec.scoring == "softmax_topk_logits" and not spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # the softmax over the kept logits
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + spec.renorm_eps)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    if spec.weights_dtype is not None:
        weights = weights.to(spec.weights_dtype)
    return weights, ids


def _mask_to_best_groups(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Keep only the experts of the `topk_group` best groups eligible (others set to -inf)."""
    tokens, num_experts = choice.shape
    grouped = choice.view(tokens, spec.n_group, num_experts // spec.n_group)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores, spec.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, num_experts)
    return choice.masked_fill(~keep, float("-inf"))


def drop_under_threshold(weights: torch.Tensor, ids: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 0 and id -1 where w_i < threshold * sum_j w_j, except each row's largest weight."""
    keep = weights >= threshold * weights.sum(dim=-1, keepdim=True)
    keep.scatter_(1, weights.argmax(dim=-1, keepdim=True), True)
    return weights.masked_fill(~keep, 0.0), ids.masked_fill(~keep, -1)
