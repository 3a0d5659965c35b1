"""The placement step of `accelerate(model, devices=..., parallel=...)`: choose a plan, apply it, undo it.

In one process the plans are one GPU or a pipeline over several. Under torchrun (torch.distributed
initialised with several processes) they are expert, tensor or data parallel over the ranks. The
offload plan is `accelerate(model, gpu_memory=...)`; the predictor ranks it, the user asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ..costmodel.hardware import GIB, Hardware
from ..costmodel.predictor import (
    DISTRIBUTED_KINDS,
    RESERVE_GIB,
    PlacementPlan,
    Prediction,
    Workload,
    predict,
    runtime_bytes,
    tensor_parallel_refusal,
)
from ..costmodel.ranking import rank_plans
from ..costmodel.shapes import ModelShape, shape_of_model, with_fp8
from ..patches.expert_dtype import BLOCK_SIZE
from ..state import drop_state_if_empty, ensure_state, state_of
from .distributed import (
    UndoLog,
    check_same_weights,
    distributed_world,
    local_rank,
    rank_device,
    replicate,
    shard_expert_parallel,
    shard_tensor_parallel,
    single_device,
)
from .shards import (
    check_loaded_shard,
    check_share_quantizable,
    loaded_shard,
    shard_layout,
)

logger = logging.getLogger("hf_moe_accel")

Parallel = Literal["auto", "single", "pp", "ep", "tp", "dp"]
PARALLEL_CHOICES: tuple[str, ...] = ("auto", "single", "pp", "ep", "tp", "dp")
Devices = Sequence[int | str | torch.device] | Literal["auto", "cpu"] | None
# What "auto" optimises for when it knows nothing of the workload: one sequence, protocol lengths.
DEFAULT_WORKLOAD = Workload(batch=1, prompt_len=128, new_tokens=128)


@dataclass(frozen=True)
class PlacementDecision:
    plan: PlacementPlan
    devices: tuple[torch.device, ...]  # the GPUs of this process (a rank has one)
    prediction: Prediction | None  # None on CPU, where nothing is predicted


@dataclass
class PlacementState:
    """What `apply_placement` did to a model: the decision, and how to undo it."""

    decision: PlacementDecision
    undo: UndoLog


def placement_of(model: nn.Module) -> PlacementDecision | None:
    """The plan `accelerate` applied to this model, or None."""
    state = state_of(model)
    return state.placement.decision if state is not None and state.placement is not None else None


# ---- choosing --------------------------------------------------------------------------------


def choose_placement(model: nn.Module, *, devices: Devices = None, parallel: str | None = None, cuda_graphs: bool = True,
                     expert_dtype: str | None = None) -> PlacementDecision | None:
    """Validate `devices`/`parallel` and choose the plan, before anything changes; None: no placement.
    `expert_dtype`: the experts will be quantized to it (`accelerate(expert_dtype=...)`): plans are
    costed at those bytes (experts already stored in FP8 are read as such from the model)."""
    if parallel is not None and parallel not in PARALLEL_CHOICES:
        raise ValueError(f"parallel={parallel!r}; expected one of {', '.join(map(repr, PARALLEL_CHOICES))}")
    loaded = loaded_shard(model)
    if loaded is not None:
        parallel = _loaded_plan(model, loaded, parallel)
    if devices is None and parallel is None:
        return None
    single_device(model)  # raises for a model already spread over devices
    if distributed_world() is not None:
        return _plan_distributed(model, devices, parallel or "auto", cuda_graphs, expert_dtype)
    return _plan_local(model, devices, parallel or "auto", cuda_graphs, expert_dtype)


def _planned_shape(shape: ModelShape, expert_dtype: str | None) -> ModelShape:
    """The sizes the plan will run at: the experts in `expert_dtype` where it quantizes them."""
    return with_fp8(shape) if expert_dtype == "fp8" else shape


def _loaded_plan(model: nn.Module, loaded, parallel: str | None) -> str:
    """The plan for a model that holds one rank's share (`load_for_rank`): the one it was loaded for,
    on the ranks it was loaded on; anything else can't run on these tensors."""
    if parallel in (None, "auto"):
        parallel = loaded.kind
    world = distributed_world()
    rank, size = world if world is not None else (0, 1)
    check_loaded_shard(model, loaded, parallel, rank, size)
    return parallel


def _cuda_device(entry: int | str | torch.device) -> torch.device:
    try:
        device = torch.device("cuda", entry) if isinstance(entry, int) else torch.device(entry)
    except (RuntimeError, TypeError):
        raise ValueError(f"devices: can't read {entry!r} as a GPU (give indices like [0, 1], 'auto' or 'cpu')") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type != "cuda" or device.index is None or not 0 <= device.index < count:
        available = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise ValueError(f"devices: {entry!r} doesn't exist here ({available}); give GPU indices, 'auto' or 'cpu'")
    return device


def _local_devices(devices: Devices) -> tuple[torch.device, ...]:
    if devices is None or devices == "auto":
        if not torch.cuda.is_available():
            raise ValueError("devices='auto' found no CUDA GPU; use devices='cpu' or leave devices out")
        return tuple(torch.device("cuda", i) for i in range(torch.cuda.device_count()))
    if devices == "cpu":
        return (torch.device("cpu"),)
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(f"devices={devices!r}; expected a non-empty list of GPU indices, 'auto' or 'cpu'")
    resolved = tuple(_cuda_device(d) for d in devices)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"devices={list(devices)!r} names a GPU twice")
    return resolved


def _hardware_for(devices: tuple[torch.device, ...]) -> Hardware:
    from ..costmodel.machine import hardware_of_this_machine

    memory = min(torch.cuda.get_device_properties(d).total_memory for d in devices) / GIB
    return hardware_of_this_machine().with_gpus(len(devices)).with_gpu_memory(memory)


def _require_fit(prediction: Prediction) -> None:
    if not prediction.feasible:
        raise ValueError(f"plan {prediction.plan.label} can't run: {prediction.reason}")


def _plan_local(model: nn.Module, devices: Devices, parallel: str, cuda_graphs: bool, expert_dtype: str | None = None) -> PlacementDecision:
    if parallel in DISTRIBUTED_KINDS:
        raise ValueError(
            f"parallel={parallel!r} runs one process per GPU over torch.distributed: launch your script with "
            f"`torchrun --nproc-per-node N script.py` and call accelerate(model, parallel={parallel!r}) in every process"
        )
    resolved = _local_devices(devices)
    if resolved[0].type == "cpu":
        if parallel not in ("auto", "single"):
            raise ValueError(f"parallel={parallel!r} needs GPUs; on the CPU the model runs whole (parallel='single')")
        return PlacementDecision(PlacementPlan("single", 1, False), resolved, None)
    if parallel == "single" and devices in (None, "auto"):
        resolved = resolved[:1]
    if parallel == "single" and len(resolved) != 1:
        raise ValueError(f"parallel='single' runs on one GPU; devices names {len(resolved)}")
    if parallel == "pp" and len(resolved) < 2:
        raise ValueError("parallel='pp' splits the layers over several GPUs; devices names one")
    shape, hardware = _planned_shape(shape_of_model(model), expert_dtype), _hardware_for(resolved)
    if parallel == "auto":
        candidates = [PlacementPlan("single", 1, cuda_graphs)] + ([PlacementPlan("pp", len(resolved), False)] if len(resolved) > 1 else [])
    else:
        candidates = [PlacementPlan(parallel, len(resolved) if parallel == "pp" else 1, cuda_graphs and parallel == "single")]
    ranked = rank_plans(shape, hardware, DEFAULT_WORKLOAD, candidates)
    chosen = ranked[0]
    if not chosen.feasible:
        raise ValueError(_no_fit_message(ranked, shape, hardware))
    _log_faster_elsewhere(chosen, shape, hardware)
    used = resolved[: chosen.plan.gpus]
    return PlacementDecision(chosen.plan, used, chosen)


def _no_fit_message(ranked: list[Prediction], shape: ModelShape, hardware: Hardware) -> str:
    reasons = "; ".join(f"{p.plan.label}: {p.reason}" for p in ranked)
    hint = "pass gpu_memory=... to keep experts on the CPU (offload)"
    if hardware.gpu_count > 1:
        hint += f", or launch with torchrun for expert/tensor parallel over {hardware.gpu_count} GPUs"
    return f"{shape.name} ({shape.total_bytes / GIB:.1f} GiB of weights) doesn't fit: {reasons}. {hint}"


def _log_faster_elsewhere(chosen: Prediction, shape: ModelShape, hardware: Hardware) -> None:
    if hardware.gpu_count < 2:
        return
    others = [p for p in rank_plans(shape, hardware, DEFAULT_WORKLOAD) if p.feasible and p.plan.kind in DISTRIBUTED_KINDS]
    if others and others[0].decode_tokens_per_s > 1.2 * chosen.decode_tokens_per_s:
        best = others[0]
        logger.info(
            "hf_moe_accel: %s is predicted at %.0f tok/s; %s (%s) at %.0f tok/s",
            chosen.plan.label, chosen.decode_tokens_per_s, best.plan.label, best.plan.launch, best.decode_tokens_per_s,
        )


def _rank_device(devices: Devices) -> torch.device:
    if devices is None or devices == "auto":
        return rank_device()
    if devices == "cpu":
        return torch.device("cpu")
    resolved = _local_devices(devices)
    if local_rank() >= len(resolved):
        raise ValueError(f"devices={list(devices)!r} has no entry for local rank {local_rank()}: give one GPU per process on this node")
    return resolved[local_rank()]


def _plan_distributed(model: nn.Module, devices: Devices, parallel: str, cuda_graphs: bool,
                      expert_dtype: str | None = None) -> PlacementDecision:
    rank, world = distributed_world()
    if parallel not in ("auto", *DISTRIBUTED_KINDS):
        raise ValueError(f"under torch.distributed ({world} processes) parallel must be 'auto', 'ep', 'tp' or 'dp', got {parallel!r}")
    device = _rank_device(devices)
    loaded = loaded_shard(model)
    shape = loaded.model_shape if loaded is not None else shape_of_model(model)  # the whole model's sizes
    shape = _planned_shape(shape, expert_dtype)
    if device.type == "cpu":
        if parallel == "auto":
            raise ValueError("parallel='auto' predicts GPU plans; on the CPU name one: 'ep', 'tp' or 'dp'")
        _check_shardable(shape, parallel, world)
        return PlacementDecision(PlacementPlan(parallel, world, False), (device,), None)
    hardware = _hardware_for((device,)).with_gpus(world)
    graphs = cuda_graphs
    if parallel == "auto":
        candidates = [PlacementPlan(kind, world, graphs) for kind in DISTRIBUTED_KINDS]
        choice = [rank_plans(shape, hardware, DEFAULT_WORKLOAD, candidates)[0] if rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)  # every rank applies rank 0's choice
        prediction = choice[0]
        if not prediction.feasible:
            raise ValueError(f"no parallel plan over {world} GPUs fits: {prediction.plan.label}: {prediction.reason}")
    else:
        _check_shardable(shape, parallel, world)
        prediction = predict(shape, hardware, PlacementPlan(parallel, world, graphs), DEFAULT_WORKLOAD)
        _require_fit(prediction)
    return PlacementDecision(prediction.plan, (device,), prediction)


def check_fp8_placement(model: nn.Module, decision: PlacementDecision, expert_dtype: str | None) -> None:
    """For a model with FP8 experts (or `expert_dtype` to quantize them): ValueError, before anything
    changes, where the plan can't cut them with their block scales. Expert parallel keeps whole experts,
    so it always can; tensor parallel needs every cut on a block boundary (`shards.py`)."""
    if decision.plan.kind != "tp":
        return
    rank, world = distributed_world() or (0, 1)
    block = BLOCK_SIZE if expert_dtype is not None else None
    loaded = loaded_shard(model)
    try:
        if loaded is None:
            shard_layout(model, "tp", rank, world, quantize_block=block)
        elif block is not None:
            check_share_quantizable(model, loaded, block)
    except ValueError as error:
        hint = ""
        if loaded is not None:  # load_for_rank cut the plain weights where their blocks don't yet exist
            hint = (f" This share was loaded (load_for_rank) with cuts on plain columns; expert_dtype={expert_dtype!r} "
                    f"quantizes it in {block[0]}x{block[1]} blocks, which must then start at the cuts: load the whole "
                    "model (from_pretrained) and let accelerate() cut it, or load an FP8 checkpoint.")
        raise ValueError(f"accelerate(): parallel='tp' over {world} ranks with FP8 experts: {error}.{hint}") from None


def _check_shardable(shape: ModelShape, parallel: str, world: int) -> None:
    if parallel == "tp" and (refusal := tensor_parallel_refusal(shape, world)):
        raise ValueError(f"parallel='tp' over {world} ranks: {refusal}")
    if parallel == "ep" and shape.num_experts < world:
        raise ValueError(f"parallel='ep' over {world} ranks needs at least {world} experts per layer; the model has {shape.num_experts}")


# ---- applying and undoing --------------------------------------------------------------------


def apply_placement(model: nn.Module, decision: PlacementDecision) -> None:
    """Put the (patched) model where `decision` says; `remove_placement` undoes it."""
    plan, devices = decision.plan, decision.devices
    if plan.kind == "single":
        undo = replicate(model, devices[0])
    elif plan.kind == "pp":
        from .pipeline import apply_pipeline, pipeline_device_map

        undo = apply_pipeline(model, pipeline_device_map(model, _pipeline_budgets(model, devices)))
    else:
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])  # this rank's GPU: its collectives and kernel launches
        check_same_weights(model, devices[0])
        shard = {"ep": shard_expert_parallel, "tp": shard_tensor_parallel}.get(plan.kind)
        undo = shard(model, devices[0]) if shard else replicate(model, devices[0])
    ensure_state(model).placement = PlacementState(decision, undo)
    predicted = f", predicted {decision.prediction.decode_tokens_per_s:.0f} tok/s at batch 1" if decision.prediction else ""
    logger.info("hf_moe_accel: placement %s on %s%s", plan.label, ", ".join(map(str, devices)), predicted)


def _pipeline_budgets(model: nn.Module, devices: tuple[torch.device, ...]) -> dict[int, int]:
    """Bytes of weights each GPU may take: its memory less the reserve and its share of KV cache and workspace."""
    runtime = runtime_bytes(shape_of_model(model), DEFAULT_WORKLOAD) / len(devices)
    budgets = {}
    for device in devices:
        total = torch.cuda.get_device_properties(device).total_memory
        budgets[device.index] = int(total - RESERVE_GIB * GIB - runtime)
    return budgets


def remove_placement(model: nn.Module) -> None:
    """Undo `apply_placement`: hooks off, original tensors back, the model on its original device."""
    state = state_of(model)
    if state is not None and state.placement is not None:
        state.placement.undo.undo()
        state.placement = None
        drop_state_if_empty(model)
