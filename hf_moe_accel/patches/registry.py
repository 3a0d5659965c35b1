"""Find the MoE blocks of a loaded model, pick each one's family adapter, patch and unpatch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..kernels.spec import is_experts_module
from .adapter import FamilyAdapter
from .attention import apply_decode_attention, remove_decode_attention
from .experts import ExpertsState, accelerated_experts_forward, activation_from_act_fn
from .families import ADAPTERS
from .norms import patch_norms
from .projections import patch_projections
from .router import patch_router
from .swap import is_swapped, restore, swap_forward

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
    if getattr(experts, "has_post_expert_norm", False):
        raise _unsupported(f"{name} applies a norm after each expert, which the fused kernels don't compute")
    if getattr(experts, "_is_expert_parallel", False):
        raise _unsupported(f"{name} is sharded by Transformers' expert parallelism")
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


def _find_experts(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, parent block, experts module) for each experts module of the model."""
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if is_experts_module(child):
                found.append((f"{parent_name}.{child_name}".lstrip("."), parent, child))
    return found


def patch_model(model: nn.Module) -> PatchReport:
    """Patch every MoE block of `model` in place; raises before changing anything on bad input."""
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
        model_type = experts.config.model_type
        adapter = ADAPTER_BY_MODEL_TYPE.get(model_type)
        if adapter is None:
            raise _unsupported(f"{type(experts).__name__} (family {model_type!r}) has no adapter")
        plan.append((name, parent, experts, adapter, _check_layout(experts, adapter)))

    report = PatchReport()
    try:
        for name, parent, experts, adapter, activation in plan:
            swap_forward(experts, accelerated_experts_forward, ExpertsState(type(experts).forward, activation))
            report.experts.append(name)
            report.families.add(experts.config.model_type)
            router = getattr(parent, adapter.router_attr, None)
            if router is not None and patch_router(router, adapter):
                report.routers.append(name.rsplit(".", 1)[0] + f".{adapter.router_attr}")
        report.norms = patch_norms(model)
        report.projections = patch_projections(model)
        report.decode_attention = apply_decode_attention(model)
    except BaseException:
        unpatch_model(model)  # all or nothing: never leave a half-patched model
        raise
    return report


def unpatch_model(model: nn.Module) -> None:
    """Put every swapped module of `model` back to its original class, and its attention implementation."""
    remove_decode_attention(model)
    for module in model.modules():
        if is_swapped(module):
            restore(module)
