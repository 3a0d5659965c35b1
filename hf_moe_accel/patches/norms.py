"""Fused RMSNorm for the norm modules of a patched model.

A module is taken only if it is an RMSNorm of the usual formula (`kernels.rmsnorm_reference`):
that is checked at patch time by running the module's own forward against the reference on
random inputs, so a variant (Gemma's 1 + weight, a different cast order) keeps its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import SERVED_DTYPES
from ..kernels.rmsnorm import rmsnorm_reference
from .swap import STATE_ATTR, swap_forward

_EPS_ATTRS = ("variance_epsilon", "eps")


@dataclass(frozen=True)
class NormState:
    original_forward: object
    eps: float


def _epsilon(module: nn.Module) -> float | None:
    for name in _EPS_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def follows_reference(module: nn.Module, eps: float) -> bool:
    """Whether the module's forward equals rmsnorm_reference, in float32 and in its weight's dtype."""
    weight = module.weight
    generator = torch.Generator().manual_seed(0)
    for dtype in {torch.float32, weight.dtype}:
        x = torch.randn(3, weight.shape[0], generator=generator).to(device=weight.device, dtype=dtype)
        try:
            with torch.no_grad():
                ours, theirs = rmsnorm_reference(x, weight, eps), module(x)
        except Exception:  # a norm whose forward takes other arguments
            return False
        if ours.dtype != theirs.dtype or ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            return False
    return True


def fused_rmsnorm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    state: NormState = getattr(self, STATE_ATTR)
    # Under torch.compile (compile_decode) the stock math is traced instead: inductor fuses it with the
    # residual add before it and the projections' casts after it, which an opaque kernel would split.
    if torch.compiler.is_compiling() or self.training or not (
        hidden_states.is_cuda and hidden_states.dtype in SERVED_DTYPES and self.weight.is_cuda
    ):
        return state.original_forward(self, hidden_states)
    from ..kernels.rmsnorm import rmsnorm_triton

    return rmsnorm_triton(hidden_states, self.weight, state.eps)


def patch_norms(model: nn.Module) -> list[str]:
    """Swap every RMSNorm module that follows the reference formula; returns their names."""
    patched = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        eps = _epsilon(module)
        if not type(module).__name__.endswith("RMSNorm") or eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            continue
        if weight.device.type == "meta" or not follows_reference(module, eps):
            continue
        swap_forward(module, fused_rmsnorm_forward, NormState(type(module).forward, eps))
        patched.append(name)
    return patched
