"""Find the MoE blocks of a loaded model, pick each one's family adapter, patch and unpatch."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

from torch import nn

from ..kernels.spec import is_experts_module
from . import fp8_experts, mxfp4_experts
from .adapter import FamilyAdapter
from .attention import apply_decode_attention, remove_decode_attention
from .expert_dtype import (
    RELOAD_HINT,
    ExpertDtype,
    needs_quantizing,
    quantize_experts,
    quantize_problem,
    release_originals,
    restore_experts,
)
from .experts import (
    EXPERTS_IMPLEMENTATION,
    ExpertsState,
    activation_from_act_fn,
    dispatch_interface,
    dispatches_through_interface,
    experts_state,
    serve_interface,
)
from .families import ADAPTERS
from .implementations import ImplementationName, stock_name
from .norms import patch_norms
from .projections import patch_projections
from .router import patch_router
from .swap import STATE_ATTR, is_swapped, restore, swapped_state

ADAPTER_BY_MODEL_TYPE: dict[str, FamilyAdapter] = {t: a for a in ADAPTERS for t in a.model_types}
# Class names that look like an MoE block Transformers runs with its own eager forward.
_MOE_CLASS_NAME = re.compile(r"(Experts|MoE|Moe|MoeBlock|SparseMoeBlock|SparseMLP)$")
ADAPTER_HOWTO = "add a FamilyAdapter for it in hf_moe_accel/patches/families.py (see docs/ADAPTERS.md)"


class UnsupportedMoEError(ValueError):
    """A model has MoE blocks whose family or layout this version doesn't understand."""


@dataclass
class PatchReport:
    """What `accelerate` changed, for `unpatch` and for bug reports."""

    experts: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    families: set[str] = field(default_factory=set)
    norms: list[str] = field(default_factory=list)  # RMSNorm modules running the fused kernel
    projections: list[str] = field(default_factory=list)  # attention modules whose q/k/v run in one decode launch
    decode_attention: bool = False  # one-token queries on patches/attention.py's decode attention
    quantized: list[str] = field(default_factory=list)  # experts whose weights expert_dtype quantized at patch time
    # Experts served from Transformers' packed MXFP4 storage (gpt-oss with the hub kernels loaded).
    mxfp4: list[str] = field(default_factory=list)
    # An MXFP4 checkpoint that Transformers dequantized at load (no hub kernels, or dequantize=True):
    # its experts are bf16 and served as any bf16 gpt-oss.
    mxfp4_dequantized: bool = False


def supported_families() -> list[str]:
    return sorted(ADAPTER_BY_MODEL_TYPE)


def _unsupported(what: str) -> UnsupportedMoEError:
    return UnsupportedMoEError(
        f"{what}. Supported families (config.model_type): {', '.join(supported_families())}. "
        f"To support another family, {ADAPTER_HOWTO}."
    )


def _check_layout(experts: nn.Module, adapter: FamilyAdapter):
    """The experts' Activation; raises when the layout is one the kernels don't compute."""
    name = type(experts).__name__
    if mxfp4_experts.is_mxfp4_experts(experts):  # no experts interface: served by a forward swap
        if problem := mxfp4_experts.layout_problem(experts):
            raise UnsupportedMoEError(f"{name} ({mxfp4_experts.FORMAT}): {problem}. {mxfp4_experts.LAYOUT_FIX}.")
        if getattr(experts, "_is_hooked", False) or getattr(experts, "_is_expert_parallel", False):
            raise _unsupported(f"{name} is sharded by Transformers' expert parallelism")
        return mxfp4_experts.activation(experts)
    if not dispatches_through_interface(experts):
        raise _unsupported(
            f"{name} doesn't dispatch its forward through Transformers' ALL_EXPERTS_FUNCTIONS (or, for FP8 experts, "
            "ALL_FP8_EXPERTS_FUNCTIONS; a subclass may override forward, another interface can't hold ours), so the "
            f"{EXPERTS_IMPLEMENTATION!r} experts implementation can't reach it"
        )
    fp8 = fp8_experts.is_fp8_experts(experts)
    if fp8 and (problem := fp8_experts.layout_problem(experts)):
        raise UnsupportedMoEError(f"{name}: {problem}. {fp8_experts.LAYOUT_FIX}.")
    if getattr(experts, "has_post_expert_norm", False):
        raise _unsupported(f"{name} applies a norm after each expert, which the fused kernels don't compute")
    if getattr(experts, "_is_expert_parallel", False):
        raise _unsupported(f"{name} is sharded by Transformers' expert parallelism")
    if fp8:  # FP8Experts' own _apply_gate replaced the family's experts
        activation = fp8_experts.activation(experts)
        if activation is None:
            raise UnsupportedMoEError(f"{name}: its gating (FP8Experts._apply_gate for this config) has no fused "
                                      f"activation. {fp8_experts.LAYOUT_FIX}.")
        return activation
    if adapter.activation is not None:
        activation = adapter.activation(experts)
        if activation is None:
            raise _unsupported(f"{name}: its family adapter can't describe this configuration's activation")
        return activation
    if type(experts)._apply_gate.__name__ != "_default_apply_gate":
        raise _unsupported(f"{name} has its own gating (_apply_gate) and its family adapter doesn't describe it")
    activation = activation_from_act_fn(experts)
    if activation is None:
        raise _unsupported(f"{name} uses activation {type(getattr(experts, 'act_fn', None)).__name__}")
    return activation


def _check_quantizable(name: str, experts: nn.Module) -> bool:
    """Whether expert_dtype="fp8" quantizes this module; ValueError when it can't. Transformers' FP8Experts
    are left as they are, also those whose weights its quantizer left unquantized (their scale
    parameters are its own)."""
    if fp8_experts.is_fp8_experts(experts) or not needs_quantizing(experts):
        return False
    problem = quantize_problem(experts)
    if problem:
        raise ValueError(f"accelerate(expert_dtype='fp8'): {name} ({type(experts).__name__}) can't be quantized: {problem}")
    return True


def _find_experts(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, parent block, experts module) for each experts module of the model."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if is_experts_module(child) or mxfp4_experts.is_mxfp4_experts(child):
                found.append((f"{parent_name}.{child_name}".lstrip("."), parent, child))
    return found


def patch_model(model: nn.Module, expert_dtype: ExpertDtype | None = None, keep_original_experts: bool = False) -> PatchReport:
    """Patch every MoE block of `model` in place; raises before changing anything on bad input.

    expert_dtype="fp8" quantizes the experts not already in FP8 (patches/expert_dtype.py); their originals
    stay held until `release_original_experts`, which accelerate() calls once it has succeeded, so that
    a failure up to then restores them."""
    found = _find_experts(model)
    if not found:
        unknown = sorted({type(m).__name__ for m in model.modules() if _MOE_CLASS_NAME.search(type(m).__name__)})
        if unknown:
            raise _unsupported(
                f"{type(model).__name__} has MoE modules ({', '.join(unknown)}) that don't follow Transformers' "
                "experts interface (`use_experts_implementation`)"
            )
        raise ValueError(f"no MoE block found in {type(model).__name__}: hf_moe_accel accelerates Mixture-of-Experts models only")

    plan = []
    for name, parent, experts in found:
        # Mxfp4GptOssExperts keeps no config: Transformers builds it for gpt-oss only.
        model_type = "gpt_oss" if mxfp4_experts.is_mxfp4_experts(experts) else experts.config.model_type
        adapter = ADAPTER_BY_MODEL_TYPE.get(model_type)
        if adapter is None:
            raise _unsupported(f"{type(experts).__name__} (family {model_type!r}) has no adapter")
        activation = _check_layout(experts, adapter)
        mxfp4 = mxfp4_experts.is_mxfp4_experts(experts)
        if mxfp4 and expert_dtype == "fp8":
            raise ValueError(f"accelerate(expert_dtype='fp8'): {name} is stored in {mxfp4_experts.FORMAT}, which the "
                             "kernels serve as it is; requantizing it to FP8 would lose precision")
        quantize = expert_dtype == "fp8" and _check_quantizable(name, experts)
        plan.append((name, parent, experts, adapter, activation, quantize))

    report = PatchReport()
    previous: dict[int, str | None] = {}  # by id(config): its experts implementation before this call
    try:
        for name, parent, experts, adapter, activation, quantize in plan:
            if mxfp4_experts.is_mxfp4_experts(experts):
                mxfp4_experts.patch(experts, parent, activation)
                report.experts.append(name)
                report.mxfp4.append(name)
                report.families.add("gpt_oss")
                router = getattr(parent, adapter.router_attr, None)
                if router is not None and patch_router(router, adapter):
                    report.routers.append(name.rsplit(".", 1)[0] + f".{adapter.router_attr}")
                continue
            if (interface := dispatch_interface(experts)) is not None:
                serve_interface(interface)
            quantized = quantize_experts(experts, keep_original_experts) if quantize else None  # all or nothing
            config = experts.config
            if id(config) not in previous:
                previous[id(config)] = _claim_experts_config(config)
            object.__setattr__(experts, STATE_ATTR, ExpertsState(activation, previous[id(config)], quantized))
            report.experts.append(name)
            if quantized is not None:
                report.quantized.append(name)
            report.families.add(experts.config.model_type)
            router = getattr(parent, adapter.router_attr, None)
            if router is not None and patch_router(router, adapter):
                report.routers.append(name.rsplit(".", 1)[0] + f".{adapter.router_attr}")
        report.mxfp4_dequantized = mxfp4_experts.mxfp4_dequantized_at_load(model)
        report.norms = patch_norms(model)
        report.projections = patch_projections(model)
        report.decode_attention = apply_decode_attention(model)
    except BaseException:
        unpatch_model(model)  # all or nothing: never leave a half-patched model
        raise
    return report


def check_unpatchable(model: nn.Module) -> None:
    """RuntimeError, changing nothing, when unpatching would leave experts quantized by expert_dtype whose
    originals were released (accelerate() without keep_original_experts=True)."""
    lost = [name for name, module in model.named_modules()
            if (state := experts_state(module)) is not None and state.quantized is not None and not state.quantized.restorable]
    if lost:
        raise RuntimeError(
            f"unpatch(): {len(lost)} experts modules of {type(model).__name__} ({lost[0]}, ...) were quantized to FP8 by "
            f"accelerate(expert_dtype='fp8') and their original weights were released; unpatching would leave them "
            f"quantized, so the model stays accelerated. To get the original model, {RELOAD_HINT}."
        )


def release_original_experts(model: nn.Module) -> None:
    """Drop the original weights of the experts expert_dtype quantized, unless kept (keep_original_experts)."""
    for module in model.modules():
        state = experts_state(module)
        if state is not None and state.quantized is not None:
            release_originals(state.quantized)


def unpatch_model(model: nn.Module) -> None:
    """Put every swapped module of `model` back to its original class, its attention implementation, its
    experts' configs back to the experts implementation they had (unless the user has set another), and
    the original weights of experts expert_dtype quantized; `check_unpatchable` first, so that a refusal
    changes nothing."""
    check_unpatchable(model)
    remove_decode_attention(model)
    released: dict[int, tuple] = {}
    for module in model.modules():
        if isinstance(swapped_state(module), mxfp4_experts.Mxfp4State):
            mxfp4_experts.unpatch(module)  # its stock tensors back; the class below
        state = experts_state(module)
        if state is not None:
            if state.quantized is not None:
                restore_experts(module, state.quantized)
            released.setdefault(id(module.config), (module.config, state.previous))
            del module.__dict__[STATE_ATTR]
        if is_swapped(module):
            restore(module)
    for config, before in released.values():
        _release_experts_config(config, before)


# Accelerated models holding each experts config, by id(config): two models built from one config
# object share it, and its implementation goes back only when the last of them is unpatched. Each
# entry's finalizer drops it with its config (whose id may then be reused).
_HOLDERS: dict[int, tuple[int, weakref.finalize]] = {}


def _claim_experts_config(config) -> str | None:
    """Make `config` name our experts implementation; returns the name it had (the stock one behind it
    when another accelerated model already set ours)."""
    before = stock_name(config._experts_implementation)
    key = id(config)
    holders, finalizer = _HOLDERS.get(key) or (0, weakref.finalize(config, _HOLDERS.pop, key, None))
    _HOLDERS[key] = (holders + 1, finalizer)
    # On the config itself, not through set_experts_implementation: that writes nothing for a model
    # whose source it doesn't recognise, and recurses into sub-configs we didn't patch.
    config._experts_implementation_internal = ImplementationName(EXPERTS_IMPLEMENTATION, before)
    return before


def _release_experts_config(config, before: str | None) -> None:
    """One holder of `config` unpatched; the last puts `before` back, unless the user set another name."""
    holders, finalizer = _HOLDERS.get(id(config)) or (1, None)  # a deep copy's config: held by its model alone
    if holders > 1:
        _HOLDERS[id(config)] = (holders - 1, finalizer)
        return
    if finalizer is not None:
        finalizer.detach()
        del _HOLDERS[id(config)]
    if config._experts_implementation == EXPERTS_IMPLEMENTATION:
        config._experts_implementation_internal = before
