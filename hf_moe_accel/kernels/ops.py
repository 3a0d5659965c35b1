"""The fused kernels as torch custom ops, so that torch.compile keeps them opaque.

Traced code (`accelerate(model, compile_decode=True)`: the decode step under torch.compile) calls
`route`, `fused_experts` and `decode_linears` here instead of `kernels.route` / `kernels.fused_experts`: dynamo then
records one op per call instead of tracing into the kernels' launch code (Triton launches, tuned
config look-ups, the reference path's host-synced loop), and inductor fuses the model's elementwise
work around them. A schema can't carry the spec dataclasses, so their fields travel as primitives and
the ops rebuild them. Eager code keeps calling the kernels directly: the custom-op dispatch costs host
time on every call (eager prefill, the CPU-offload path).
"""

import torch

from . import fused_experts as _fused_experts
from . import route as _route
from .decode_linear import decode_linears_triton
from .spec import Activation, BlockScales, ExpertWeights, RoutingSpec


@torch.library.custom_op("hf_moe_accel::fused_experts", mutates_args=())
def fused_experts_op(
    hidden_states: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    transposed: bool,
    interleaved: bool,
    has_gate: bool,
    activation: str,
    alpha: float,
    limit: float,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    scale_block_rows: int = 0,
    scale_block_cols: int = 0,
) -> torch.Tensor:
    # Block scales (FP8 weights) travel as their two tensors and the block's extents; none for plain weights.
    scales = None if gate_up_scale is None else BlockScales(gate_up_scale, down_scale, (scale_block_rows, scale_block_cols))
    weights = ExpertWeights(gate_up, down, gate_up_bias, down_bias, transposed, interleaved, has_gate,
                            Activation(activation, alpha, limit), scales)
    return _fused_experts(hidden_states, weights, topk_ids, topk_weights)


@fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, gate_up, down, gate_up_bias, down_bias, transposed, interleaved, has_gate,
                        activation, alpha, limit, topk_ids, topk_weights, gate_up_scale=None, down_scale=None,
                        scale_block_rows=0, scale_block_cols=0) -> torch.Tensor:
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)  # [T, H], hidden_states' dtype


@torch.library.custom_op("hf_moe_accel::route", mutates_args=())
def route_op(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    num_experts: int,
    scoring: str,
    renormalize: bool,
    renorm_eps: float,
    n_group: int,
    topk_group: int,
    group_score: str,
    has_correction_bias: bool,
    routed_scaling_factor: float,
    weights_dtype: torch.dtype | None,
    expert_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = RoutingSpec(top_k, num_experts, scoring, renormalize, renorm_eps, n_group, topk_group, group_score,
                       has_correction_bias, routed_scaling_factor, weights_dtype, expert_threshold)
    return _route(logits, spec, correction_bias)


@route_op.register_fake
def _route_fake(logits, correction_bias, top_k, num_experts, scoring, renormalize, renorm_eps, n_group, topk_group,
                group_score, has_correction_bias, routed_scaling_factor, weights_dtype, expert_threshold):
    # Both paths (route_triton, route_reference) give float32 weights unless the spec casts them, and int64 ids.
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=weights_dtype or torch.float32), logits.new_empty(shape, dtype=torch.int64)


def fused_experts(
    hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """`kernels.fused_experts` as one opaque op (for code torch.compile traces)."""
    act = weights.activation
    args = (hidden_states, weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias, weights.transposed,
            weights.interleaved, weights.has_gate, act.kind, act.alpha, act.limit, topk_ids, topk_weights)
    if weights.scales is None:
        return fused_experts_op(*args)
    scales = weights.scales
    return fused_experts_op(*args, scales.gate_up, scales.down, *scales.block_size)


def route(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.route` as one opaque op (for code torch.compile traces)."""
    return route_op(logits, correction_bias, spec.top_k, spec.num_experts, spec.scoring, spec.renormalize,
                    spec.renorm_eps, spec.n_group, spec.topk_group, spec.group_score, spec.has_correction_bias,
                    spec.routed_scaling_factor, spec.weights_dtype, spec.expert_threshold)


@torch.library.custom_op("hf_moe_accel::decode_linears", mutates_args=())
def decode_linears_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                      out_dtype: torch.dtype | None) -> list[torch.Tensor]:
    return decode_linears_triton(x, weights, biases, out_dtype)


@decode_linears_op.register_fake
def _decode_linears_fake(x, weights, biases, out_dtype) -> list[torch.Tensor]:
    return [x.new_empty(*x.shape[:-1], w.shape[0], dtype=out_dtype or x.dtype) for w in weights]


def decode_linears(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                   out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """`decode_linear.decode_linears_triton` (inputs it fits), as one opaque op under torch.compile and a plain call outside it."""
    if torch.compiler.is_compiling():
        return decode_linears_op(x, weights, biases, out_dtype)
    return decode_linears_triton(x, weights, biases, out_dtype)
