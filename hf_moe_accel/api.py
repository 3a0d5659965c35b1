"""The one-liner: `accelerate(model)` validates options, patches the model in place, installs graph decode."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from .costmodel.predictor import PlacementPlan
from .graphs import check_compile_decode, disable_graph_decode, enable_graph_decode
from .graphs.hooks import NO_HOOKS
from .kernels import SERVED_DTYPES
from .offload.engine import (
    OffloadOptions,
    apply_offload,
    prepare_offload,
    remove_offload,
)
from .parallel.distributed import single_device
from .parallel.place import (
    PARALLEL_CHOICES,
    Devices,
    Parallel,
    PlacementDecision,
    apply_placement,
    check_fp8_placement,
    choose_placement,
    remove_placement,
)
from .patches.expert_dtype import ExpertDtype, check_expert_dtype
from .patches.fp8_experts import has_fp8_experts
from .patches.mxfp4_experts import has_mxfp4_experts
from .patches.registry import (
    PatchReport,
    check_unpatchable,
    patch_model,
    release_original_experts,
    unpatch_model,
)
from .quality.selection import TopK, apply_expert_selection, check_expert_selection
from .state import drop_state_if_empty, ensure_state, state_of

logger = logging.getLogger("hf_moe_accel")


def accelerate(
    model: nn.Module,
    *,
    cuda_graphs: bool = True,
    compile_decode: bool = False,
    top_k: TopK | None = None,
    expert_threshold: float | None = None,
    gpu_memory: str | int | None = None,
    offload: OffloadOptions | None = None,
    devices: Devices = None,
    parallel: Parallel | None = None,
    expert_dtype: ExpertDtype | None = None,
    keep_original_experts: bool = False,
) -> nn.Module:
    """Make a loaded Transformers MoE model fast, in place; returns the same model object.

    Every MoE block's router and experts run through fused kernels (Triton on a GPU, the
    plain-torch reference path on CPU). Parameters are shared, never copied; `unpatch(model)`
    undoes it. Calling it again on an accelerated model changes nothing.

    Options:
        cuda_graphs: on a CUDA model, `generate()` decodes through captured CUDA graphs over a
            static KV cache (prefill stays eager); what a graph can't serve runs eagerly, with
            one log line saying why. False keeps every step eager.
        compile_decode: each captured decode step is the model under torch.compile (inductor fuses the
            attention blocks' small kernels; the MoE kernels stay opaque ops); the first decode step of each
            shape (batch size, cache length bucket) pays the compile time. Needs cuda_graphs=True.
        top_k: experts activated per token, an int or one per MoE layer (default: the model's own);
            fewer experts is less work and some quality cost (`hf-moe-accel eval` measures it).
        expert_threshold: per token, drop the experts whose normalised routing weight is under this
            fraction in [0, 1) (the largest always stays), renormalising as the family's router does.
        gpu_memory: a GPU budget ("24GiB", "512MB", or bytes) for a model larger than the GPU: non-expert
            weights, KV cache and workspace on the GPU, a cache of expert slots in the rest, all experts in
            pinned host memory; misses run on the CPU or are fetched (load the model with device_map="cpu").
            A budget that holds every expert (slots left to us) places the whole model on the GPU instead.
        offload: OffloadOptions for gpu_memory (eviction policy, miss policy, prefetch, reserve sizes).
        devices: GPUs to place the model on ([0, 1], "auto" for all, "cpu"); the predictor picks the
            fastest plan that fits. Under torchrun, this rank's GPU (default cuda:LOCAL_RANK).
        parallel: force a plan: "single", "pp" (layers over `devices`, one process), or under torchrun
            "ep" (experts split over ranks), "tp" (heads and expert inner dim split), "dp" (replicas);
            "auto" (default when `devices` is given) asks the predictor.
        expert_dtype: "fp8" quantizes the experts once, here, to block-scaled float8_e4m3fn (Transformers'
            fine-grained FP8 layout: 128x128 blocks, float32 scales), freeing their original memory;
            activations keep the model's dtype. None (default) keeps the checkpoint's weights. Experts
            already in FP8 (a FineGrainedFP8Config checkpoint) run in the same kernels either way.
        keep_original_experts: with expert_dtype, keep the original expert weights in host memory, so that
            `unpatch(model)` restores them bitwise; without it `unpatch` refuses (reload the model instead).
    """
    _check_model(model, "accelerate")
    _check_option_types(cuda_graphs=cuda_graphs, compile_decode=compile_decode, devices=devices, parallel=parallel)
    check_expert_dtype(expert_dtype, keep_original_experts)
    if is_accelerated(model):
        asked = {name: value for name, value in (("top_k", top_k), ("expert_threshold", expert_threshold),
                 ("gpu_memory", gpu_memory), ("offload", offload), ("devices", devices), ("parallel", parallel),
                 ("compile_decode", compile_decode or None), ("expert_dtype", expert_dtype)) if value is not None}
        if asked:  # never a silent no-op: the model keeps the options of the first call
            raise ValueError(f"{type(model).__name__} is already accelerated; call unpatch(model) first to apply {', '.join(asked)}")
        logger.info("%s is already accelerated; nothing to do", type(model).__name__)
        return model
    check_expert_selection(top_k, expert_threshold)  # bad values raise before anything changes
    check_compile_decode(compile_decode, cuda_graphs)
    if offload is not None and gpu_memory is None:
        raise TypeError("accelerate(): offload options need gpu_memory=...")
    if gpu_memory is not None and (devices is not None or parallel is not None):
        raise TypeError("accelerate(): gpu_memory (offload to one GPU) doesn't combine with devices/parallel; pick the GPU with OffloadOptions(device=...)")
    if gpu_memory is not None and has_mxfp4_experts(model):
        # The offload engine's host copies, slots and address tables know bf16 and FP8 layouts only.
        raise ValueError("accelerate(): gpu_memory doesn't offload MXFP4 experts yet; load the model with "
                         "quantization_config=Mxfp4Config(dequantize=True) to offload it in bf16, or leave gpu_memory out")
    fp8 = expert_dtype is not None or has_fp8_experts(model)
    # Offload holds the experts as patch_model leaves them (expert_dtype quantizes first): FP8 bytes and scales.
    offload_setup = prepare_offload(model, gpu_memory, offload, expert_dtype) if gpu_memory is not None else None
    placement = choose_placement(model, devices=devices, parallel=parallel, cuda_graphs=cuda_graphs,
                                 expert_dtype=expert_dtype)
    if fp8 and placement is not None:
        check_fp8_placement(model, placement, expert_dtype)  # tensor parallel cuts FP8 experts on whole scale blocks
    if offload_setup is not None and offload_setup.caches_every_expert and _on_one_device(model):
        logger.info("hf_moe_accel: the whole model fits in gpu_memory (%s): placed on %s, no expert offload",
                    offload_setup.budget.describe(), offload_setup.device)
        placement = PlacementDecision(PlacementPlan("single", 1, cuda_graphs), (offload_setup.device,), None)
        offload_setup = None
    # Steps, in order: patch the MoE blocks; expert-selection options; then (placement) where the
    # weights live; graph decode last, since graphs capture the final placement.
    report = patch_model(model, expert_dtype=expert_dtype, keep_original_experts=keep_original_experts)
    hooks = NO_HOOKS
    try:
        apply_expert_selection(model, top_k, expert_threshold)  # unpatch drops it with the router state
        if offload_setup is not None:
            hooks = apply_offload(model, offload_setup)
        if placement is not None:
            apply_placement(model, placement)
    except BaseException:
        unpatch_model(model)
        raise
    release_original_experts(model)  # accelerate() succeeded: the originals stay only where kept
    ensure_state(model).report = report
    _warn_if_dtype_unserved(model)
    if cuda_graphs:
        enable_graph_decode(model, compile_decode=compile_decode, hooks=hooks)
    logger.info(
        "hf_moe_accel: patched %d MoE blocks (%d routers fused) of %s (%s)%s",
        len(report.experts),
        len(report.routers),
        type(model).__name__,
        ", ".join(sorted(report.families)),
        _decode_summary(model, cuda_graphs, compile_decode),
    )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules of an accelerated model; parameters are untouched (and back on
    their devices after an offload). Experts quantized by `expert_dtype` get their original weights back
    where `keep_original_experts=True` kept them; otherwise RuntimeError, changing nothing."""
    _check_model(model, "unpatch")
    check_unpatchable(model)
    disable_graph_decode(model)
    remove_offload(model)
    remove_placement(model)
    unpatch_model(model)
    state = state_of(model)
    if state is not None:
        state.report = None
        drop_state_if_empty(model)
    return model


def is_accelerated(model: nn.Module) -> bool:
    _check_model(model, "is_accelerated")
    return patch_report(model) is not None


def patch_report(model: nn.Module) -> PatchReport | None:
    """What `accelerate` patched on this model, or None."""
    _check_model(model, "patch_report")
    state = state_of(model)
    return None if state is None else state.report


def _warn_if_dtype_unserved(model: nn.Module) -> None:
    # float8 weights are quantized storage (FP8 experts, Transformers' FP8 linears), not a compute dtype
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() > 1}
    unserved = sorted(str(d) for d in dtypes if d not in SERVED_DTYPES)
    if unserved:
        logger.warning(
            "hf_moe_accel: the fused kernels serve %s; parameters in %s run through the plain-torch reference path",
            ", ".join(str(d) for d in SERVED_DTYPES),
            ", ".join(unserved),
        )


def _check_model(model: object, function: str) -> None:
    """The model argument is a loaded torch.nn.Module (TypeError saying how to get one otherwise): a
    path or a Hub id is the most likely mistake, so a string is told to load it first."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{function}() takes a loaded model, not a path ({os.fspath(model)!r}): load it first with "
                        f"AutoModelForCausalLM.from_pretrained({os.fspath(model)!r}), then {function}(model)")
    raise TypeError(f"{function}() expects a loaded torch.nn.Module (a Transformers MoE model from "
                    f"AutoModelForCausalLM.from_pretrained(...)), got {type(model).__name__}")


def _check_option_types(*, cuda_graphs: object, compile_decode: object, devices: object, parallel: object) -> None:
    """Options of the wrong type are refused before anything changes (TypeError naming the option).
    A flag takes only True or False: any other value (a string "no" is truthy) would silently mean
    something. The option values themselves are checked where they are used (ValueError)."""
    for name, value in (("cuda_graphs", cuda_graphs), ("compile_decode", compile_decode)):
        if not isinstance(value, bool):
            raise TypeError(f"accelerate(): {name} must be True or False, got {value!r} ({type(value).__name__})")
    if parallel is not None and not isinstance(parallel, str):
        raise TypeError(f"accelerate(): parallel must be one of {', '.join(map(repr, PARALLEL_CHOICES))} or None, "
                        f"got {parallel!r} ({type(parallel).__name__})")
    if devices is not None and not isinstance(devices, (str, Sequence)):
        hint = f"; for one GPU give a list, devices=[{devices}]" if isinstance(devices, int) and not isinstance(devices, bool) else ""
        raise TypeError(f"accelerate(): devices must be a list of GPU indices, 'auto' or 'cpu', got {devices!r} "
                        f"({type(devices).__name__}){hint}")


def _decode_summary(model: nn.Module, cuda_graphs: bool, compile_decode: bool) -> str:
    """The end of accelerate()'s one log line: how generate() will decode. Graphs and the fused kernels
    need CUDA; without CUDA in this process the plain-torch reference path runs and graphs never
    serve, which the line says instead of promising graphs."""
    graphs = f"CUDA graphs{' (compiled steps)' if compile_decode else ''}"
    if not torch.cuda.is_available():
        return f"; no CUDA here, so the plain-torch reference path runs and generate() decodes eagerly ({graphs} need CUDA)"
    if not any(p.is_cuda for p in model.parameters()):
        return ("; the model is not on CUDA, so the plain-torch reference path runs"
                + (f" (generate() decodes through {graphs} once the model is on CUDA)" if cuda_graphs else ""))
    return f"; generate() decodes through {graphs}" if cuda_graphs else "; generate() decodes eagerly (cuda_graphs=False)"


def _on_one_device(model: nn.Module) -> bool:
    try:
        single_device(model)
    except ValueError:  # spread by a device map, or meta tensors: the offload path handles those
        return False
    return True
