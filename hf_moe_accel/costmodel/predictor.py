"""The cost model: predicted decode tokens/s and memory per GPU of each plan, from sizes and rates.

A decode step streams weights and KV cache from HBM (or computes, when the batch is large), and
pays host time on top:

- CUDA-graph decode: the replay's GPU time is the streamed bytes plus a floor per decoder layer
  (its ~30 small kernels each cost a few us even when their bytes are tiny: `graph_layer_us`).
  generate()'s loop on the host syncs once per step; the part of it before the replay is launched
  (`graph_host_exposed_us`) adds to the replay, the rest runs while the GPU replays, so the step is
  max(host loop, exposed host + replay).
- Eager decode: every layer's Python and launches (`eager_layer_host_us`) plus the GPU work.
- Offload, decode of up to ZERO_COPY_MAX_BATCH sequences: zero-copy (OffloadOptions' default on a
  GPU): the fused kernels read every routed expert, from a slot or from pinned host memory at
  `zero_copy_share` of the PCIe copy rate (one token: once per pair; more: once per BLOCK_M tile of an
  expert's pairs, `expert_tiles`, kernels.address_path), in CUDA graphs (eager: the host's launches overlap
  those reads, nothing syncs). Larger batches: the expert cache, eager, plus each MoE layer's host
  round trip (routing to the host, slot lookup, results back: `offload_layer_host_us`), during
  which the GPU waits, and the misses' PCIe fetches or CPU compute. A budget that holds every
  expert runs as the single-GPU plan (accelerate() places the whole model then).
Multi-GPU plans add their collectives.

KV traffic follows the cache Transformers uses: eager decode's DynamicCache concatenates each new
token (reading and writing the whole cache) before attention reads it: 3x the cache. Graph decode's
static cache is read at its full length bucket (graphs/cache_pool.py), once (grouped query heads
folded onto their KV head, not copied out by repeat_kv).

Expert traffic assumes uniform routing (random-weight benchmark models): a layer touches
E * (1 - (1 - k/E)^B) distinct experts at batch B. Trained models route with skew; pass a
measured cache hit rate in `Workload.hit_rate` for offload.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PretrainedConfig

from ..kernels.tuning import address_path, prefill_block_m
from .hardware import GIB, Hardware
from .memory import SlotBudget, length_bucket, reserve_bytes, split_budget
from .shapes import FP8_BLOCK, ModelShape

PlanKind = Literal["single", "pp", "ep", "tp", "dp", "offload"]
PLAN_KINDS: tuple[str, ...] = ("single", "pp", "ep", "tp", "dp", "offload")
# Plans that run one process per GPU over torch.distributed (launched with torchrun).
DISTRIBUTED_KINDS = ("ep", "tp", "dp")

# Constants of our code, not of the hardware (how to re-derive each in its comment; the figures behind
# them: docs/BENCHMARKS.md). Predicted against measured over whole plans: `python scripts/check_predictor.py`.
# The share of the measured copy bandwidth the fused MoE layer streams at from 16 tokens up, graph replay
# (the "% of HBM limit" column of `python scripts/bench_moe_layer.py --tokens 16,64,256`); dense cuBLAS
# GEMVs are taken alike.
STREAM_EFFICIENCY = 0.92
# The grouped expert GEMMs' FLOP rate at 4096 tokens (`python scripts/bench_moe_layer.py --tokens 4096`)
# over a large cuBLAS bf16 matmul's; dense projections nearer cuBLAS's rate.
MOE_GEMM_EFFICIENCY = 0.6
DENSE_GEMM_EFFICIENCY = 0.85
# Host time of one collective call (eager) and of accelerate's device-alignment hooks per layer.
COLLECTIVE_HOST_US = 30.0
PIPELINE_HOOK_HOST_US = 80.0
# CUDA context, cuBLAS workspace and allocator slack on each GPU.
RESERVE_GIB = 1.0
# Offload decode runs zero-copy up to this many sequences (the default of OffloadOptions.zero_copy_max_tokens).
ZERO_COPY_MAX_BATCH = 128
# Expected maximum of n standard normals (load of the busiest expert-parallel rank).
_MAX_OF_NORMALS = {1: 0.0, 2: 0.5642, 3: 0.8463, 4: 1.0294, 5: 1.1630, 6: 1.2672, 7: 1.3522, 8: 1.4236}


@dataclass(frozen=True)
class Workload:
    """A decode workload: `batch` sequences, `prompt_len` prompt tokens, `new_tokens` generated.

    hit_rate: the offload plan's expert-cache hit rate; None takes uniform routing (slots / experts).
    """

    batch: int = 1
    prompt_len: int = 128
    new_tokens: int = 128
    hit_rate: float | None = None

    def __post_init__(self) -> None:
        if self.batch < 1 or self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError(f"batch, prompt_len and new_tokens must be positive, got {self}")
        if self.hit_rate is not None and not 0.0 <= self.hit_rate <= 1.0:
            raise ValueError(f"hit_rate must be in [0, 1], got {self.hit_rate}")

    @property
    def mean_context(self) -> int:
        """Context length averaged over the decode steps."""
        return self.prompt_len + self.new_tokens // 2

    @property
    def max_context(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclass(frozen=True)
class PlacementPlan:
    """Where the model runs: `kind` over `gpus` GPUs, decode eager or through CUDA graphs.

    single  one GPU holds everything
    pp      pipeline: consecutive layers on consecutive GPUs, one process (accelerate device map)
    ep      expert parallel: each rank holds 1/n of every layer's experts; rest replicated (torchrun)
    tp      tensor parallel: attention heads and each expert's inner dim split n ways (torchrun)
    dp      data parallel: n full replicas, each decoding 1/n of the batch (torchrun)
    offload one GPU holds the non-expert weights and a cache of experts; the rest on the CPU
    """

    kind: PlanKind
    gpus: int = 1
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"unknown plan {self.kind!r}; plans: {', '.join(PLAN_KINDS)}")
        if self.gpus < 1 or (self.kind in ("single", "offload") and self.gpus != 1):
            raise ValueError(f"plan {self.kind} can't run on {self.gpus} GPUs")

    @property
    def label(self) -> str:
        name = self.kind if self.gpus == 1 else f"{self.kind} x{self.gpus}"
        return name if self.cuda_graphs else f"{name} (eager)"

    @property
    def launch(self) -> str:
        """How the plan is started."""
        if self.kind in DISTRIBUTED_KINDS:
            return f"torchrun --nproc-per-node {self.gpus}"
        return "one process"


@dataclass
class Prediction:
    plan: PlacementPlan
    workload: Workload
    decode_tokens_per_s: float
    step_ms: float
    ttft_ms: float
    memory_gib: float  # on the most loaded GPU
    feasible: bool
    reason: str = ""
    parts_ms: dict[str, float] = field(default_factory=dict)  # the step time's components

    def as_dict(self) -> dict:
        return {
            "plan": self.plan.label,
            "kind": self.plan.kind,
            "gpus": self.plan.gpus,
            "cuda_graphs": self.plan.cuda_graphs,
            "launch": self.plan.launch,
            "batch": self.workload.batch,
            "prompt_len": self.workload.prompt_len,
            "new_tokens": self.workload.new_tokens,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "step_ms": self.step_ms,
            "ttft_ms": self.ttft_ms,
            "memory_gib_per_gpu": self.memory_gib,
            "feasible": self.feasible,
            "reason": self.reason,
            "parts_ms": self.parts_ms,
        }


# ---- pieces of a step ------------------------------------------------------------------------


def touched_experts(shape: ModelShape, tokens: int) -> float:
    """Expected distinct experts one layer reads for `tokens` tokens, under uniform routing."""
    return shape.num_experts * (1.0 - (1.0 - shape.top_k / shape.num_experts) ** tokens)


def expert_tiles(shape: ModelShape, tokens: int, block_m: int) -> float:
    """Expected row tiles of `block_m` pairs over one layer's experts for `tokens` tokens, under uniform
    routing: each tile reads its expert's weights, so an expert with more pairs than a tile is read
    again (an expert's pairs are Binomial(tokens, k/E)). At least touched_experts; equal to it when
    block_m >= tokens. Log-space terms: the binomial coefficients overflow a float past ~1000 tokens."""
    p = shape.top_k / shape.num_experts
    if p >= 1.0:
        return shape.num_experts * math.ceil(tokens / block_m)
    log_p, log_q, log_all = math.log(p), math.log1p(-p), math.lgamma(tokens + 1)
    expected = 0.0
    for pairs in range(1, tokens + 1):
        log_pmf = log_all - math.lgamma(pairs + 1) - math.lgamma(tokens - pairs + 1) + pairs * log_p + (tokens - pairs) * log_q
        expected += math.exp(log_pmf) * math.ceil(pairs / block_m)
    return shape.num_experts * expected


def _busiest_share(count: float, n: int) -> float:
    """Expected maximum over n ranks of a per-rank count whose mean is `count` (Poisson-like spread)."""
    z = _MAX_OF_NORMALS.get(n, math.sqrt(2 * math.log(n)))
    return count + z * math.sqrt(count)


def _stream_s(nbytes: float, flops: float, hw: Hardware, gemm_efficiency: float) -> float:
    """Time to read `nbytes` from HBM or do `flops`, whichever bounds."""
    return max(nbytes / (hw.hbm_tb_s * 1e12 * STREAM_EFFICIENCY), flops / (hw.gemm_tflops * 1e12 * gemm_efficiency))


def _expert_params(shape: ModelShape) -> float:
    return shape.expert_weight_params


def kv_traffic_bytes(shape: ModelShape, workload: Workload, batch: int, cuda_graphs: bool) -> tuple[float, float]:
    """(KV cache bytes attention reads, bytes moved in all) of one decode step, by the cache decode uses.

    Eager (DynamicCache): torch.cat rewrites the cache with each new token, then attention reads it.
    Graphs (static cache): the whole length bucket, once: grouped query heads are folded onto their KV
    head (`patches/attention.py`), not expanded by repeat_kv. SDPA reads the bucket under the mask;
    the decode attention kernel skips masked keys, so there this is an upper bound.
    """
    if not cuda_graphs:
        read = shape.kv_bytes(batch, workload.mean_context)
        return read, 3 * read
    read = shape.kv_bytes(batch, length_bucket(workload.max_context))
    return read, read


def _dense_s(shape: ModelShape, hw: Hardware, tokens: int, kv: tuple[float, float], *, attention_share: float = 1.0,
             kv_share: float = 1.0) -> float:
    """Attention, norms, routers, shared/dense MLPs, embedding rows and head for `tokens` decode tokens;
    `kv` from `kv_traffic_bytes` (read, moved)."""
    weights = shape.attention_bytes * attention_share + shape.other_bytes + shape.lm_head_bytes
    params = shape.attention_weight_params * attention_share + (shape.other_bytes + shape.lm_head_bytes) / shape.dtype_bytes
    kv_read, kv_moved = kv[0] * kv_share, kv[1] * kv_share
    embed_rows = tokens * shape.hidden_size * shape.dtype_bytes
    # Scores and weighted sum: 2 FLOPs per (query head x key element); queries share each KV head.
    group = shape.num_heads / shape.num_kv_heads
    flops = 2 * tokens * params + 2 * group * kv_read / shape.dtype_bytes
    return _stream_s(weights + kv_moved + embed_rows, flops, hw, DENSE_GEMM_EFFICIENCY)


def _moe_s(shape: ModelShape, hw: Hardware, experts_read: float, pairs: float, share: float = 1.0) -> float:
    """All MoE layers: `experts_read` experts per layer streamed (at `share` of each), `pairs` token-expert pairs."""
    nbytes = shape.moe_layers * experts_read * shape.expert_bytes * share
    flops = shape.moe_layers * 2 * pairs * _expert_params(shape) * share
    return _stream_s(nbytes, flops, hw, MOE_GEMM_EFFICIENCY)


def _eager_host_s(shape: ModelShape, hw: Hardware, extra_layer_us: float = 0.0) -> float:
    return (shape.num_layers * (hw.eager_layer_host_us + extra_layer_us) + hw.eager_step_host_us) * 1e-6


def _step_parts(shape: ModelShape, hw: Hardware, cuda_graphs: bool, gpu_parts: dict[str, float],
                extra_layer_us: float = 0.0) -> dict[str, float]:
    """The step's parts (seconds, summing to the step) given its GPU work `gpu_parts`.

    Graphs: the replay adds a floor per layer; the host loop's exposed part precedes the replay and
    the rest overlaps it, so "host" is what the loop adds beyond the replay. `extra_layer_us`: host
    time per layer of the plan's own calls (eager only; a graph replays them).
    """
    if not cuda_graphs:
        return {**gpu_parts, "host": _eager_host_s(shape, hw, extra_layer_us)}
    parts = {**gpu_parts, "kernel_floor": shape.num_layers * hw.graph_layer_us * 1e-6}
    replay = sum(parts.values())
    parts["host"] = max(hw.graph_host_exposed_us * 1e-6, hw.graph_step_host_us * 1e-6 - replay)
    return parts


def _allreduce_s(hw: Hardware, nbytes: float, n: int) -> float:
    return hw.link_latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / (hw.link_gb_s * 1e9)


def _workspace_bytes(shape: ModelShape, workload: Workload) -> float:
    """Activations of the prefill (the peak) and logits, on one GPU."""
    batch = workload.batch
    tokens = batch * workload.prompt_len
    per_token = (
        10 * shape.hidden_size * shape.dtype_bytes
        + 2 * shape.top_k * shape.expert_inner * shape.dtype_bytes
        + (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * shape.dtype_bytes
    )
    return tokens * per_token + 2 * batch * shape.vocab_size * 4


def runtime_bytes(shape: ModelShape, workload: Workload) -> float:
    """Memory beside the weights on one GPU holding the whole batch: KV cache at full length and workspace."""
    return shape.kv_bytes(workload.batch, workload.max_context) + _workspace_bytes(shape, workload)


def _prefill_s(shape: ModelShape, hw: Hardware, workload: Workload, batch: int, share: float = 1.0) -> float:
    """Time to first token: every weight read once, compute for batch x prompt tokens, eager host."""
    tokens = batch * workload.prompt_len
    dense_params = shape.attention_weight_params + shape.other_bytes / shape.dtype_bytes
    attention_flops = 2 * batch * workload.prompt_len**2 * shape.num_heads * shape.head_dim * shape.num_layers
    dense = _stream_s(
        (shape.attention_bytes + shape.other_bytes + shape.lm_head_bytes) * share,
        (2 * tokens * dense_params + attention_flops) * share + 2 * batch * shape.lm_head_bytes / shape.dtype_bytes,
        hw,
        DENSE_GEMM_EFFICIENCY,
    )
    moe = _moe_s(shape, hw, touched_experts(shape, tokens), tokens * shape.top_k, share)
    return dense + moe + _eager_host_s(shape, hw)


# ---- plans -----------------------------------------------------------------------------------


def _result(plan, workload, step_s, ttft_s, memory_bytes, hw, parts, reason="") -> Prediction:
    """A Prediction; infeasible when `reason` is given or the memory (plus the reserve) exceeds the GPU's."""
    memory_gib = memory_bytes / GIB + RESERVE_GIB
    if not reason and memory_gib > hw.gpu_memory_gib:
        reason = f"needs {memory_gib:.1f} GiB per GPU, has {hw.gpu_memory_gib:.1f}"
    return Prediction(
        plan=plan,
        workload=workload,
        decode_tokens_per_s=workload.batch / step_s,
        step_ms=1e3 * step_s,
        ttft_ms=1e3 * ttft_s,
        memory_gib=memory_gib,
        feasible=not reason,
        reason=reason,
        parts_ms={k: 1e3 * v for k, v in parts.items()},
    )


def _predict_single(shape, hw, plan, workload) -> Prediction:
    batch = workload.batch
    kv = kv_traffic_bytes(shape, workload, batch, plan.cuda_graphs)
    gpu = _dense_s(shape, hw, batch, kv) + _moe_s(shape, hw, touched_experts(shape, batch), batch * shape.top_k)
    parts = _step_parts(shape, hw, plan.cuda_graphs, {"gpu": gpu})
    memory = shape.total_bytes + shape.kv_bytes(batch, workload.max_context) + _workspace_bytes(shape, workload)
    return _result(plan, workload, sum(parts.values()), _prefill_s(shape, hw, workload, batch), memory, hw, parts)


def _predict_pipeline(shape, hw, plan, workload) -> Prediction:
    n, batch = plan.gpus, workload.batch
    if plan.cuda_graphs:
        return _result(plan, workload, 1.0, 1.0, 0.0, hw, {}, reason="pipeline decode runs eagerly (device hooks)")
    if n > shape.num_layers:
        return _result(plan, workload, 1.0, 1.0, 0.0, hw, {}, reason=f"{n} stages for {shape.num_layers} layers")
    # The stages run one after another: the single-GPU work, plus a hop of the hidden states per boundary.
    kv = kv_traffic_bytes(shape, workload, batch, cuda_graphs=False)
    gpu = _dense_s(shape, hw, batch, kv) + _moe_s(shape, hw, touched_experts(shape, batch), batch * shape.top_k)
    hops = (n - 1) * _allreduce_s(hw, batch * shape.hidden_size * shape.dtype_bytes, 2)
    parts = _step_parts(shape, hw, False, {"gpu": gpu, "transfer": hops}, PIPELINE_HOOK_HOST_US)
    # accelerate balances the layers by memory; the embedding and head sit on the end stages.
    per_stage = (shape.total_bytes + shape.kv_bytes(batch, workload.max_context)) / n
    memory = per_stage + max(shape.embedding_bytes, shape.lm_head_bytes) / 2 + _workspace_bytes(shape, workload)
    return _result(plan, workload, sum(parts.values()), _prefill_s(shape, hw, workload, batch), memory, hw, parts)


def _predict_expert_parallel(shape, hw, plan, workload) -> Prediction:
    n, batch = plan.gpus, workload.batch
    if n > shape.num_experts:
        return _result(plan, workload, 1.0, 1.0, 0.0, hw, {}, reason=f"{n} ranks for {shape.num_experts} experts")
    local_experts = math.ceil(shape.num_experts / n)
    p_touched = 1.0 - (1.0 - shape.top_k / shape.num_experts) ** batch
    busiest_read = min(local_experts, _busiest_share(local_experts * p_touched, n))
    busiest_pairs = _busiest_share(batch * shape.top_k / n, n)
    kv = kv_traffic_bytes(shape, workload, batch, plan.cuda_graphs)
    gpu = _dense_s(shape, hw, batch, kv) + _moe_s(shape, hw, busiest_read, busiest_pairs)
    comm = shape.moe_layers * _allreduce_s(hw, batch * shape.hidden_size * shape.dtype_bytes, n)
    parts = _step_parts(shape, hw, plan.cuda_graphs, {"gpu": gpu, "allreduce": comm}, COLLECTIVE_HOST_US)
    memory = (
        shape.non_expert_bytes
        + shape.moe_layers * local_experts * shape.expert_bytes
        + shape.kv_bytes(batch, workload.max_context)
        + _workspace_bytes(shape, workload)
    )
    ttft = _prefill_s(shape, hw, workload, batch, share=1.0 / n)
    return _result(plan, workload, sum(parts.values()), ttft, memory, hw, parts)


def tensor_parallel_refusal(shape: ModelShape, n: int) -> str:
    """Why tensor parallel over n ranks can't shard this model (its attention heads, its experts' inner
    dimension: parallel/shards.py's rules), or '' when it can."""
    if not shape.qkvo_attention:
        return "tensor parallel shards q/k/v/o attention; this model's attention has another layout; use parallel='ep'"
    if shape.num_heads % n:
        return f"{shape.num_heads} attention heads don't split over {n} ranks"
    if shape.num_kv_heads % n and n % shape.num_kv_heads:
        return f"{shape.num_kv_heads} KV heads don't split over (or replicate evenly on) {n} ranks"
    return _fp8_attention_refusal(shape, n) or _expert_inner_refusal(shape, n)


def _fp8_attention_refusal(shape: ModelShape, n: int) -> str:
    """FP8 attention projections are cut on whole scale blocks: each rank's query rows and KV rows must
    fill whole FP8_BLOCK-row blocks."""
    if shape.attention_format != "fp8":
        return ""
    q_rows = shape.num_heads // n * shape.head_dim
    kv_rows = max(1, shape.num_kv_heads // n) * shape.head_dim
    if q_rows % FP8_BLOCK or kv_rows % FP8_BLOCK:
        return (f"a rank's FP8 attention rows ({q_rows} query, {kv_rows} KV) don't fill whole {FP8_BLOCK}-row scale "
                "blocks; use parallel='ep'")
    return ""


def _expert_inner_refusal(shape: ModelShape, n: int) -> str:
    """Each expert's inner dimension is cut on columns (plain weights) or on whole scale blocks (FP8):
    every rank needs at least one; FP8 gate and up rows stacked in one matrix must not share a block."""
    step = shape.expert_block or 1
    blocks = -(-shape.expert_inner // step)
    if step == 1:
        return f"expert inner size {shape.expert_inner} is smaller than {n} ranks" if blocks < n else ""
    if shape.expert_gate_up_stacked and shape.expert_inner % step:
        return (f"expert inner size {shape.expert_inner} isn't a multiple of the {step}-column FP8 scale block, so "
                "gate and up rows share blocks no cut separates; use parallel='ep'")
    if blocks < n:
        return (f"FP8 experts are cut on whole scale blocks: inner size {shape.expert_inner} is {blocks} block(s) of "
                f"{step} columns, fewer than {n} ranks; use parallel='ep'")
    return ""


def tensor_parallel_expert_share(shape: ModelShape, n: int) -> float:
    """The largest rank's share of each expert under tensor parallel over n ranks. The inner dimension's
    columns (plain weights) or whole scale blocks (FP8) are dealt out, the first ranks taking one more
    where they don't divide evenly (parallel/shards.py's split_blocks); every step waits on those ranks."""
    step = shape.expert_block or 1
    blocks = -(-shape.expert_inner // step)
    largest = min(-(-blocks // n) * step, shape.expert_inner)
    return largest / shape.expert_inner


def _predict_tensor_parallel(shape, hw, plan, workload) -> Prediction:
    n, batch = plan.gpus, workload.batch
    refusal = tensor_parallel_refusal(shape, n)
    if refusal:
        return _result(plan, workload, 1.0, 1.0, 0.0, hw, {}, reason=refusal)
    kv_share = 1.0 / n if shape.num_kv_heads >= n else 1.0 / shape.num_kv_heads
    expert_share = tensor_parallel_expert_share(shape, n)
    kv = kv_traffic_bytes(shape, workload, batch, plan.cuda_graphs)
    gpu = _dense_s(shape, hw, batch, kv, attention_share=1.0 / n, kv_share=kv_share)
    gpu += _moe_s(shape, hw, touched_experts(shape, batch), batch * shape.top_k, share=expert_share)
    # One all-reduce after attention's output projection, one after the experts.
    comm = (shape.num_layers + shape.moe_layers) * _allreduce_s(hw, batch * shape.hidden_size * shape.dtype_bytes, n)
    parts = _step_parts(shape, hw, plan.cuda_graphs, {"gpu": gpu, "allreduce": comm}, 2 * COLLECTIVE_HOST_US)
    memory = (
        shape.non_expert_bytes
        - shape.attention_bytes * (1 - 1.0 / n)
        + shape.experts_total_bytes * expert_share
        + shape.kv_bytes(batch, workload.max_context) * kv_share
        + _workspace_bytes(shape, workload)
    )
    ttft = _prefill_s(shape, hw, workload, batch, share=expert_share)
    return _result(plan, workload, sum(parts.values()), ttft, memory, hw, parts)


def _predict_data_parallel(shape, hw, plan, workload) -> Prediction:
    # A batch smaller than the replica count leaves replicas idle: the step is still one replica's.
    per_replica = math.ceil(workload.batch / min(plan.gpus, workload.batch))
    one = _predict_single(shape, hw, PlacementPlan("single", 1, plan.cuda_graphs), Workload(per_replica, workload.prompt_len, workload.new_tokens))
    parts = {k: v / 1e3 for k, v in one.parts_ms.items()}
    memory = (one.memory_gib - RESERVE_GIB) * GIB
    return _result(plan, workload, one.step_ms / 1e3, one.ttft_ms / 1e3, memory, hw, parts)


def offload_slot_budget(shape: ModelShape, hw: Hardware, workload: Workload) -> SlotBudget:
    """The offload engine's own split of the budget (memory.split_budget) for this workload: the GPU's
    memory less RESERVE_GIB, a reserve sized for batch x (prompt + new tokens) of KV cache and a
    batch x prompt prefill, expert slots in the rest. ValueError when the budget is too small.

    The reserve is estimated from the shape's head sizes as the engine does from the config (MLA's
    separate key/value head sizes are not in the shape: its KV figure is approximate there)."""
    config = PretrainedConfig(
        hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, num_hidden_layers=shape.num_layers, num_experts_per_tok=shape.top_k,
        vocab_size=shape.vocab_size,
    )
    dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}.get(shape.dtype_bytes, torch.bfloat16)
    reserve = reserve_bytes(config, dtype, kv_cache_tokens=workload.batch * workload.max_context,
                            prefill_tokens=workload.batch * workload.prompt_len, expert_inner=shape.expert_inner)
    budget = int((hw.gpu_memory_gib - RESERVE_GIB) * GIB)
    layers = shape.moe_layers
    return split_budget(budget, int(shape.non_expert_bytes), reserve, [int(shape.expert_bytes)] * layers, [shape.num_experts] * layers)


def offload_slots_per_layer(shape: ModelShape, hw: Hardware, workload: Workload) -> float:
    """Expert slots per MoE layer (mean over layers) the offload engine gives this budget; 0 when it can't run."""
    try:
        plan = offload_slot_budget(shape, hw, workload)
    except ValueError:
        return 0.0
    return sum(plan.slots) / len(plan.slots)


def _predict_offload(shape, hw, plan, workload) -> Prediction:
    batch = workload.batch
    try:
        memory_plan = offload_slot_budget(shape, hw, workload)
    except ValueError as error:
        return _result(plan, workload, 1.0, 1.0, shape.non_expert_bytes, hw, {}, reason=str(error))
    slots = sum(memory_plan.slots) / len(memory_plan.slots)
    if slots >= shape.num_experts:  # accelerate() then places the whole model on the GPU, graph decode on
        single = _predict_single(shape, hw, PlacementPlan("single", 1, True), workload)
        return dataclasses.replace(single, plan=plan)
    host_needed = shape.moe_layers * (shape.num_experts - slots) * shape.expert_bytes
    if host_needed > 0.9 * hw.host_memory_gib * GIB:
        reason = f"the offloaded experts need {host_needed / GIB:.0f} GiB of host memory, the host has {hw.host_memory_gib:.0f}"
        return _result(plan, workload, 1.0, 1.0, memory_plan.total, hw, {}, reason=reason)
    hit = workload.hit_rate if workload.hit_rate is not None else slots / shape.num_experts
    if batch <= ZERO_COPY_MAX_BATCH and not shape.expert_biases:
        return _predict_zero_copy(shape, hw, plan, workload, hit, memory_plan)
    touched = touched_experts(shape, batch)
    misses = touched * (1.0 - hit)
    # A miss is fetched over PCIe and run on the GPU, or run on the CPU where the weights live; the
    # two proceed side by side, so the split that finishes both together is the best one.
    fetch = shape.expert_bytes / (hw.pcie_gb_s * 1e9)
    tokens_per_expert = batch * shape.top_k / touched
    cpu = max(shape.expert_bytes / (hw.cpu_gb_s * 1e9), 2 * tokens_per_expert * _expert_params(shape) / (hw.cpu_tflops * 1e12))
    gpu_layer = _moe_s(shape, hw, touched, batch * shape.top_k) / shape.moe_layers
    on_cpu = min(misses, max(0.0, (gpu_layer + misses * fetch) / (fetch + cpu))) if misses else 0.0
    layer = max(gpu_layer + (misses - on_cpu) * fetch, on_cpu * cpu)
    parts = {
        "gpu": _dense_s(shape, hw, batch, kv_traffic_bytes(shape, workload, batch, cuda_graphs=False)),
        "experts": shape.moe_layers * layer,
        # Each MoE layer syncs with the host (routing over, slot lookup, results back): its host work
        # runs while the GPU waits, so it adds to the step instead of overlapping.
        "offload_round_trips": shape.moe_layers * hw.offload_layer_host_us * 1e-6,
        "host": _eager_host_s(shape, hw),
    }
    ttft = _prefill_s(shape, hw, workload, batch) + shape.moe_layers * misses * fetch
    return _result(plan, workload, sum(parts.values()), ttft, memory_plan.total, hw, parts)


def _predict_zero_copy(shape, hw, plan, workload, hit: float, memory_plan: SlotBudget) -> Prediction:
    batch = workload.batch
    pairs = batch * shape.top_k
    # cached experts read from HBM, the rest from host memory: once per pair for one token, else once per
    # tile of the grouped kernels (an expert with more pairs than BLOCK_M rows is read again)
    if address_path(batch) == "decode":
        experts_read = pairs
    else:
        experts_read = expert_tiles(shape, batch, prefill_block_m(pairs, shape.num_experts))
    kv = kv_traffic_bytes(shape, workload, batch, plan.cuda_graphs)
    host_reads = shape.moe_layers * experts_read * (1.0 - hit) * shape.expert_bytes
    gpu = {
        "gpu": _dense_s(shape, hw, batch, kv) + _moe_s(shape, hw, experts_read * hit, pairs),
        "zero_copy_reads": host_reads / (hw.zero_copy_share * hw.pcie_gb_s * 1e9),
    }
    if plan.cuda_graphs:
        parts = _step_parts(shape, hw, True, gpu)
    else:  # no sync in the step: the host's launches run ahead while the GPU reads
        parts = {**gpu, "host": max(0.0, _eager_host_s(shape, hw) - sum(gpu.values()))}
    # Prefill runs the expert cache: its misses fetched (about the touched experts less the cached share).
    fetch = shape.expert_bytes / (hw.pcie_gb_s * 1e9)
    prefill_misses = touched_experts(shape, batch * workload.prompt_len) * (1.0 - hit)
    ttft = _prefill_s(shape, hw, workload, batch) + shape.moe_layers * prefill_misses * fetch
    return _result(plan, workload, sum(parts.values()), ttft, memory_plan.total, hw, parts)


_PREDICTORS = {
    "single": _predict_single,
    "pp": _predict_pipeline,
    "ep": _predict_expert_parallel,
    "tp": _predict_tensor_parallel,
    "dp": _predict_data_parallel,
    "offload": _predict_offload,
}


def predict(shape: ModelShape, hardware: Hardware, plan: PlacementPlan, workload: Workload) -> Prediction:
    """Predicted decode tokens/s, time to first token and memory per GPU of one plan."""
    if plan.gpus > hardware.gpu_count:
        raise ValueError(f"plan {plan.label} needs {plan.gpus} GPUs; the hardware has {hardware.gpu_count}")
    return _PREDICTORS[plan.kind](shape, hardware, plan, workload)
