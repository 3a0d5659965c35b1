"""Fused MoE routing: router logits [T, E] -> (top-k weights [T, k], expert ids [T, k]) in one launch.

`route_triton` computes exactly what `routing_reference.route_reference` computes, for every
`RoutingSpec`: softmax or sigmoid scores in float32, an optional correction bias used for selection
only, group-limited top-k ("max" or "top2_sum" group scores), top-k, renormalisation, scaling,
GPT-OSS's "softmax_topk_logits" (top-k over the raw logits, softmax over the k chosen ones), and the
expert threshold (dropped experts written as id -1, weight 0: the output shape stays [T, k]).

Each program routes BLOCK_T tokens held as a [BLOCK_T, BLOCK_E] tile, one lane per expert (E padded
to a power of two; the padding lanes can never be chosen). Top-k is k passes of argmax, each masking
out the lane it chose, so ids come out in descending order of the selection score and ties go to the
lowest expert id. There are no host syncs and no data-dependent shapes: the call can be captured in
a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options, prologue
from .spec import RoutingSpec

# Upper bounds on a program's tile: enough rows per program to amortise the per-program cost for
# large T, while keeping the tile in registers and leaving enough programs to fill the GPU. To
# re-derive: time `route_triton` with half and double these bounds and with one row a program, and
# keep bounds no slower than any of those.
_MAX_TILE_ELEMENTS = 1024
_MAX_BLOCK_T = 16
# Small tiles (decode) get fewer warps: shorter cross-warp reductions.
_ELEMENTS_PER_WARP = 256
_MAX_WARPS = 4


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    stride_logits_t,
    stride_logits_e,
    stride_bias,
    renorm_eps,
    scaling_factor,
    threshold,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    SCORING: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SCORE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    prologue(USE_PDL)
    neg_inf = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    lane_ok = lanes < NUM_EXPERTS

    # Rows past the end load zeros (not -inf) so that their softmax stays finite; they are never stored.
    logit_ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_logits_t + lanes[None, :] * stride_logits_e
    logits = tl.load(logit_ptrs, mask=row_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(lane_ok[None, :], logits, neg_inf)

    if SCORING == "softmax_topk_logits":
        # Select on the raw logits; the "weights" gathered below are the chosen logits.
        probs = logits
        choice = logits
    else:
        if SCORING == "softmax":
            shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            probs = shifted / tl.sum(shifted, axis=1)[:, None]
        else:
            probs = tl.sigmoid(logits)
        choice = probs
        if HAS_BIAS:
            bias = tl.load(bias_ptr + lanes * stride_bias, mask=lane_ok, other=0.0).to(tl.float32)
            choice = probs + bias[None, :]
        choice = tl.where(lane_ok[None, :], choice, neg_inf)

        if N_GROUP > 1:
            # Score each group of consecutive experts, then keep only the TOPK_GROUP best groups eligible.
            group_of_lane = lanes // (NUM_EXPERTS // N_GROUP)
            group_cols = tl.arange(0, BLOCK_G)
            group_scores = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
            for g in range(N_GROUP):
                in_group = tl.where((group_of_lane == g)[None, :], choice, neg_inf)
                score, first = tl.max(in_group, axis=1, return_indices=True)
                if GROUP_SCORE == "top2_sum":
                    second = tl.max(tl.where(lanes[None, :] == first[:, None], neg_inf, in_group), axis=1)
                    score = score + second
                group_scores = tl.where(group_cols[None, :] == g, score[:, None], group_scores)
            keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                best_group = tl.argmax(group_scores, axis=1)
                group_scores = tl.where(group_cols[None, :] == best_group[:, None], neg_inf, group_scores)
                keep = keep | (group_of_lane[None, :] == best_group[:, None])
            choice = tl.where(keep, choice, neg_inf)

    # Top-k by repeated argmax (the lowest id wins a tie); weights come from the unbiased probs (or
    # the raw logits).
    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for i in tl.static_range(TOP_K):
        weight, best = tl.max(choice, axis=1, return_indices=True)
        chosen = lanes[None, :] == best[:, None]
        if HAS_BIAS:
            # Without a bias the max is already the prob: choice equals probs on every eligible lane.
            weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        choice = tl.where(chosen, neg_inf, choice)
        in_slot = slots[None, :] == i
        top_weights = tl.where(in_slot, weight[:, None], top_weights)
        top_ids = tl.where(in_slot, best[:, None], top_ids)

    slot_ok = slots < TOP_K
    if SCORING == "softmax_topk_logits":
        top_logits = tl.where(slot_ok[None, :], top_weights, neg_inf)
        shifted = tl.exp(top_logits - tl.max(top_logits, axis=1)[:, None])
        top_weights = shifted / tl.sum(shifted, axis=1)[:, None]
    if HAS_THRESHOLD:
        # Drop the experts under `threshold` of the token's total weight, keeping the largest.
        total = tl.sum(top_weights, axis=1)
        largest = tl.argmax(top_weights, axis=1)
        keep = (top_weights >= threshold * total[:, None]) | (slots[None, :] == largest[:, None])
        top_weights = tl.where(keep, top_weights, 0.0)
        top_ids = tl.where(keep, top_ids, -1)
        if SCORING == "softmax_topk_logits" and not RENORMALIZE:  # the softmax over the kept logits
            top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    if RENORMALIZE:
        top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + renorm_eps)
    top_weights = top_weights * scaling_factor

    out_offsets = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & slot_ok[None, :]
    tl.store(weights_ptr + out_offsets, top_weights.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offsets, top_ids.to(tl.int64), mask=out_mask)


def route_triton(
    logits: torch.Tensor, spec: RoutingSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (float32 or spec.weights_dtype) and expert ids [T, k] (int64) from
    router logits [T, E], in one kernel launch; same results as `route_reference`."""
    num_tokens, num_experts = logits.shape
    top_k = spec.top_k
    weights = torch.empty((num_tokens, top_k), dtype=spec.weights_dtype or torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids

    # The reference ignores the bias and the groups when it selects on raw logits; so does the kernel.
    on_logits = spec.scoring == "softmax_topk_logits"
    has_bias = spec.has_correction_bias and not on_logits
    n_group = 1 if on_logits else spec.n_group
    _check_spec(spec, num_experts, n_group, has_bias, correction_bias)

    block_e = triton.next_power_of_2(num_experts)
    block_t = min(max(1, _MAX_TILE_ELEMENTS // block_e), _MAX_BLOCK_T, triton.next_power_of_2(num_tokens))
    bias = correction_bias if has_bias else logits  # an unread placeholder pointer without a bias
    _route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits,
        bias,
        weights,
        ids,
        num_tokens,
        logits.stride(0),
        logits.stride(1),
        bias.stride(0),
        spec.renorm_eps,
        spec.routed_scaling_factor,
        spec.expert_threshold,
        NUM_EXPERTS=num_experts,
        TOP_K=top_k,
        SCORING=spec.scoring,
        RENORMALIZE=spec.renormalize,
        HAS_THRESHOLD=spec.expert_threshold > 0,
        HAS_BIAS=has_bias,
        N_GROUP=n_group,
        TOPK_GROUP=spec.topk_group if n_group > 1 else 1,
        GROUP_SCORE=spec.group_score,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_G=triton.next_power_of_2(n_group),
        num_warps=max(1, min(_MAX_WARPS, block_t * block_e // _ELEMENTS_PER_WARP)),
        **pdl_launch_options(logits.device),
    )
    return weights, ids


def _check_spec(
    spec: RoutingSpec, num_experts: int, n_group: int, has_bias: bool, correction_bias: torch.Tensor | None
) -> None:
    """Reject specs the kernel cannot honour (host-side integer checks only, no device sync)."""
    if not 1 <= spec.top_k <= num_experts:
        raise ValueError(f"top_k={spec.top_k} must be in [1, {num_experts}]")
    if not 0.0 <= spec.expert_threshold < 1.0:
        raise ValueError(f"expert_threshold={spec.expert_threshold} must be in [0, 1)")
    if has_bias and (correction_bias is None or correction_bias.shape != (num_experts,)):
        raise ValueError(f"has_correction_bias needs a correction_bias of shape ({num_experts},)")
    if n_group > 1:
        if num_experts % n_group:
            raise ValueError(f"{num_experts} experts do not split into n_group={n_group} groups")
        group_size = num_experts // n_group
        if not 1 <= spec.topk_group <= n_group or spec.top_k > spec.topk_group * group_size:
            raise ValueError(f"topk_group={spec.topk_group} groups of {group_size} cannot hold top_k={spec.top_k}")
        if spec.group_score == "top2_sum" and group_size < 2:
            raise ValueError("group_score='top2_sum' needs at least 2 experts per group")
