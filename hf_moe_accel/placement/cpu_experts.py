"""Missed experts computed on the CPU, where their weights live (pinned host memory).

Each expert runs on the tokens routed to it only, with the arithmetic of the plain-torch reference
(GEMMs in the weights' dtype, routing weight and top-k sum in float32). The work runs on one
background thread, so the main thread meanwhile queues the GPU side's copies and kernels; torch's
intra-op thread pool spreads each GEMM over the CPU cores.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.experts_reference import apply_activation
from ..kernels.spec import ExpertWeights


@dataclass
class CpuExpertsJob:
    """The CPU share of one MoE forward: the token rows it needs and, per expert, which rows and weights."""

    tokens: torch.Tensor  # [R] int64: the layer's token indices that have at least one CPU expert
    groups: list[tuple[int, torch.Tensor, torch.Tensor]]  # (expert, rows into `tokens` [n], routing weights [n] float32)


def plan_cpu_job(topk_ids: torch.Tensor, topk_weights: torch.Tensor, on_cpu: torch.Tensor) -> CpuExpertsJob:
    """Group the (token, expert) pairs whose expert is marked in `on_cpu` (bool) by expert.

    topk_ids [T, k] int64 (indices into `on_cpu`, which may have a sentinel column beyond the experts)
    and topk_weights [T, k] float32, CPU tensors.
    """
    pair_on_cpu = on_cpu[topk_ids]
    tokens = pair_on_cpu.any(dim=1).nonzero().view(-1)
    row_of_token = torch.full((topk_ids.shape[0],), -1, dtype=torch.int64)
    row_of_token[tokens] = torch.arange(tokens.numel())
    pair_token, pair_slot = pair_on_cpu.nonzero(as_tuple=True)
    pair_expert = topk_ids[pair_token, pair_slot]
    order = torch.argsort(pair_expert, stable=True)
    pair_token, pair_slot, pair_expert = pair_token[order], pair_slot[order], pair_expert[order]
    experts, counts = torch.unique_consecutive(pair_expert, return_counts=True)
    groups = []
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        span = slice(start, start + count)
        groups.append((expert, row_of_token[pair_token[span]], topk_weights[pair_token[span], pair_slot[span]]))
        start += count
    return CpuExpertsJob(tokens, groups)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


@torch.no_grad()
def run_cpu_experts(
    x: torch.Tensor, weights: ExpertWeights, groups: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """x [R, H] on the CPU -> [R, H] float32: for each group, sum of weight * expert(x[rows])."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    x = x.to(weights.gate_up.dtype)
    for expert, rows, routing in groups:
        gate_up_bias = weights.gate_up_bias[expert] if weights.gate_up_bias is not None else None
        down_bias = weights.down_bias[expert] if weights.down_bias is not None else None
        inter = apply_activation(_project(x[rows], weights.gate_up[expert], gate_up_bias, weights.transposed), weights)
        y = _project(inter, weights.down[expert], down_bias, weights.transposed)
        out.index_add_(0, rows, y.float() * routing.unsqueeze(1))
    return out


class CpuExpertsWorker:
    """One background thread running CPU expert jobs; results come back with their wall time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_moe_accel-cpu-experts")

    def submit(self, x: torch.Tensor, weights: ExpertWeights, job: CpuExpertsJob) -> Future:
        return self._pool.submit(_timed_run, x, weights, job.groups)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _timed_run(x: torch.Tensor, weights: ExpertWeights, groups) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = run_cpu_experts(x, weights, groups)
    return out, time.perf_counter() - start
