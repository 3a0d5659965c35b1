"""Missed experts computed on the CPU, where their weights live (pinned host memory).

Each expert runs on the tokens routed to it only, with the arithmetic of the plain-torch reference
(GEMMs in the weights' dtype, routing weight and top-k sum in float32). The work runs on one
background thread, so the main thread meanwhile queues the GPU side's copies and kernels; torch's
intra-op thread pool spreads each GEMM over the CPU cores.

CPUs differ widely in half-precision GEMMs: where bf16 has no hardware path, torch's bf16 GEMM
runs one token at a time, or worse, at a fraction of the memory bandwidth. An expert with at least
`upcast_from_tokens` tokens therefore runs in float32 instead, its weights upcast a cache-sized
chunk at a time (never a whole float32 copy); the calibration (`miss_cost`) measures both ways on
the user's machine and sets the crossover.

Block-scaled (FP8) experts stay FP8 in host memory; the expert a job computes is dequantized on the
spot (that expert only) to the activations' dtype, or to float32 where it upcasts, as the fused
kernels' reference (`experts_fp8_reference`) dequantizes it: weight-only FP8, the same numbers as on
the GPU side.

With int4 host copies (`OffloadOptions(host_dtype="int4")`, `host_int4`) the expert a job computes is
dequantized from them on the spot the same way, to the dtype it computes in, in F.linear's orientation.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.experts_fp8_reference import dequantize_blocks
from ..kernels.experts_reference import apply_activation
from ..kernels.spec import ExpertWeights
from .host_int4 import Int4Experts


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


# Elements of one upcast weight chunk: 4 MiB in float32, which stays in a core's L2/L3 while used.
_UPCAST_CHUNK_ELEMENTS = 1 << 20


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


def _project_upcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """`_project` in float32 (x float32): the weight upcast in chunks of output features, into one
    buffer (fresh multi-MiB allocations would cost page faults on every call)."""
    in_features, out_features = weight.shape if transposed else weight.shape[::-1]
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    step = max(1, _UPCAST_CHUNK_ELEMENTS // in_features)
    buffer = torch.empty(step * in_features, dtype=torch.float32)
    for start in range(0, out_features, step):
        part = weight[:, start : start + step] if transposed else weight[start : start + step]
        chunk = buffer[: part.numel()].view(part.shape).copy_(part)
        out[:, start : start + part.shape[-1 if transposed else 0]] = x @ chunk if transposed else F.linear(x, chunk)
    return out + bias.float() if bias is not None else out


def compute_dtype(weights: ExpertWeights, activations: torch.dtype) -> torch.dtype:
    """The dtype an expert's GEMMs run in without upcasting: the weights' own, or the activations' for
    block-scaled weights (stored FP8 is no compute dtype)."""
    return activations if weights.scales is not None else weights.gate_up.dtype


def _expert_matrices(weights: ExpertWeights, expert: int, dtype: torch.dtype,
                     int4: Int4Experts | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One expert's gate_up and down as its GEMMs take them, and whether they are transposed: views as
    stored, or for block-scaled weights or int4 copies dequantized to `dtype` (only this expert's, a
    transient copy; int4 ones in F.linear's orientation)."""
    if int4 is not None:
        return (*int4.matrices(expert, dtype), False)
    if weights.scales is None:
        return weights.gate_up[expert], weights.down[expert], weights.transposed
    scales = weights.scales
    return (dequantize_blocks(weights.gate_up[expert], scales.gate_up[expert], scales.block_size, dtype),
            dequantize_blocks(weights.down[expert], scales.down[expert], scales.block_size, dtype), weights.transposed)


@torch.no_grad()
def run_cpu_experts(
    x: torch.Tensor,
    weights: ExpertWeights,
    groups: list[tuple[int, torch.Tensor, torch.Tensor]],
    upcast_from_tokens: float = math.inf,
    int4: Int4Experts | None = None,
) -> torch.Tensor:
    """x [R, H] on the CPU -> [R, H] float32: for each group, sum of weight * expert(x[rows]). Experts
    with at least `upcast_from_tokens` rows compute in float32 (half-precision compute only). With
    `int4`, the experts' matrices come from those copies (biases from `weights`)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    native_dtype = compute_dtype(weights, x.dtype)
    if native_dtype == torch.float32:
        upcast_from_tokens = math.inf  # nothing to upcast
    x_native, x_float = x.to(native_dtype), x.float()
    for expert, rows, routing in groups:
        gate_up_bias = weights.gate_up_bias[expert] if weights.gate_up_bias is not None else None
        down_bias = weights.down_bias[expert] if weights.down_bias is not None else None
        upcast = rows.numel() >= upcast_from_tokens
        gate_up, down, transposed = _expert_matrices(weights, expert, torch.float32 if upcast else native_dtype, int4)
        # Stored half-precision weights upcast a chunk at a time; dequantized ones are float32 already.
        project = _project_upcast if upcast and weights.scales is None and int4 is None else _project
        rows_x = (x_float if upcast else x_native)[rows]
        inter = apply_activation(project(rows_x, gate_up, gate_up_bias, transposed), weights)
        y = project(inter, down, down_bias, transposed)
        out.index_add_(0, rows, y.float() * routing.unsqueeze(1))
    return out


class CpuExpertsWorker:
    """One background thread running CPU expert jobs; results come back with their wall time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_moe_accel-cpu-experts")

    def submit(self, x: torch.Tensor, weights: ExpertWeights, job: CpuExpertsJob,
               upcast_from_tokens: float = math.inf, int4: Int4Experts | None = None) -> Future:
        return self._pool.submit(_timed_run, x, weights, job.groups, upcast_from_tokens, int4)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _timed_run(x: torch.Tensor, weights: ExpertWeights, groups, upcast_from_tokens: float,
               int4: Int4Experts | None) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = run_cpu_experts(x, weights, groups, upcast_from_tokens, int4)
    return out, time.perf_counter() - start
