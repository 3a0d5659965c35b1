"""Plain-torch fused-experts computation: the CPU path and the oracle for the Triton kernels.

Same arithmetic as Transformers' `grouped_mm` experts path: GEMMs in the weights' dtype, the
routing weight applied per (token, expert) pair, the top-k sum accumulated in float32 (float64
for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import CLAMPED_SWIGLUS, Activation, ExpertWeights


def apply_activation(gate_up: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
    """[..., 2I] gate/up projections (or [..., I] up only) -> [..., I] activated."""
    act = weights.activation
    if not weights.has_gate:
        return _elementwise(gate_up, act)
    if weights.interleaved:
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    else:
        gate, up = gate_up.chunk(2, dim=-1)
    if act.kind in CLAMPED_SWIGLUS:
        up = up.clamp(min=-act.limit, max=act.limit)
        if act.kind == "swiglu_post_clamped":
            return F.silu(gate).clamp(max=act.limit) * up
        gate = gate.clamp(max=act.limit)
        if act.kind == "swiglu_oai":
            return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
        return F.silu(gate) * up
    return _elementwise(gate, act) * up


def _elementwise(x: torch.Tensor, act: Activation) -> torch.Tensor:
    if act.kind == "silu":
        return F.silu(x)
    if act.kind == "gelu":
        return F.gelu(x)
    if act.kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act.kind == "relu":
        return F.relu(x)
    if act.kind == "relu2":
        return F.relu(x).square()
    raise ValueError(f"activation {act.kind!r} needs a gate")


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


def experts_reference(
    hidden_states: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """hidden_states [T, H], topk_ids/topk_weights [T, k] -> [T, H] in hidden_states' dtype.

    An id of -1 means "no expert" (dropped by a threshold, a cache miss served elsewhere, a remote
    expert): that pair adds nothing, whatever its weight.
    """
    num_tokens, hidden_size = hidden_states.shape
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # the -1 pairs sort first
    counts = torch.bincount(flat_ids + 1, minlength=weights.num_experts + 1).tolist()
    acc_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    pair_out = torch.zeros(num_tokens * top_k, hidden_size, dtype=acc_dtype, device=hidden_states.device)
    x_dtype = weights.gate_up.dtype
    start = counts.pop(0)
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        x = hidden_states[pairs // top_k].to(x_dtype)
        gate_up_bias = weights.gate_up_bias[expert] if weights.gate_up_bias is not None else None
        down_bias = weights.down_bias[expert] if weights.down_bias is not None else None
        inter = apply_activation(_project(x, weights.gate_up[expert], gate_up_bias, weights.transposed), weights)
        pair_out[pairs] = _project(inter, weights.down[expert], down_bias, weights.transposed).to(acc_dtype)
    routing = topk_weights.reshape(-1, 1).to(acc_dtype)
    pair_out *= torch.where(flat_ids.unsqueeze(1) >= 0, routing, 0.0)  # a dropped pair's weight may be anything
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden_states.dtype)


def used_experts(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] (-1: no expert) -> (the experts some pair uses, sorted; topk_ids renumbered into
    that list, -1 kept). The quantized references dequantize only those experts."""
    used = topk_ids[topk_ids >= 0].unique()  # sorted
    return used, torch.where(topk_ids >= 0, torch.searchsorted(used, topk_ids.clamp_min(0)), -1)
