"""The one-liner: `accelerate(model)` validates options and patches the model in place."""

from __future__ import annotations

import logging

from torch import nn

from .kernels import SERVED_DTYPES
from .patches.registry import PatchReport, patch_model, unpatch_model

logger = logging.getLogger("hf_moe_accel")

# Options this version understands; each later feature adds its own.
KNOWN_OPTIONS: frozenset[str] = frozenset()
_REPORT_ATTR = "_hf_moe_accel_report"


def accelerate(model: nn.Module, **options) -> nn.Module:
    """Make a loaded Transformers MoE model fast, in place; returns the same model object.

    Every MoE block's router and experts run through fused kernels (Triton on a GPU, the
    plain-torch reference path on CPU). Parameters are shared, never copied; `unpatch(model)`
    undoes it. Calling it again on an accelerated model changes nothing.
    """
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        known = ", ".join(sorted(KNOWN_OPTIONS)) or "none in this version"
        raise TypeError(f"accelerate() got unknown option(s): {', '.join(unknown)} (known options: {known})")
    if is_accelerated(model):
        logger.info("%s is already accelerated; nothing to do", type(model).__name__)
        return model
    report = patch_model(model)
    setattr(model, _REPORT_ATTR, report)
    _warn_if_dtype_unserved(model)
    logger.info(
        "hf_moe_accel: patched %d MoE blocks (%d routers fused) of %s (%s)",
        len(report.experts),
        len(report.routers),
        type(model).__name__,
        ", ".join(sorted(report.families)),
    )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules of an accelerated model; parameters are untouched."""
    unpatch_model(model)
    if hasattr(model, _REPORT_ATTR):
        delattr(model, _REPORT_ATTR)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return hasattr(model, _REPORT_ATTR)


def patch_report(model: nn.Module) -> PatchReport | None:
    """What `accelerate` patched on this model, or None."""
    return getattr(model, _REPORT_ATTR, None)


def _warn_if_dtype_unserved(model: nn.Module) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    unserved = sorted(str(d) for d in dtypes if d not in SERVED_DTYPES)
    if unserved:
        logger.warning(
            "hf_moe_accel: the fused kernels serve %s; parameters in %s run through the plain-torch reference path",
            ", ".join(str(d) for d in SERVED_DTYPES),
            ", ".join(unserved),
        )
