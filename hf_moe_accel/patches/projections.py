"""Attention projections at decode steps: q, k and v in one launch, o_proj on the same kernel where tuned.

At a decode step's few tokens each projection is a matrix-vector product whose fixed launch cost
rivals its weight's read time (`kernels.decode_linear`). An attention module's q_proj, k_proj and
v_proj read the same hidden states one after the other, so q_proj computes all three in one
launch and hands k and v to the next two calls, which check that they get the very tensor q_proj
got (else they compute their own). The modules keep their parameters (nothing copied or
concatenated: state dicts, `.to()`, weight updates all stay as they were). Training, larger
inputs and anything the kernel doesn't take run the stock forward. o_proj alone has no launches to
save: it takes the kernel only where the device's tuned data has a config for its shape (written by
`python scripts/bench_decode_linear.py --linears qkv,o,router --write` where the kernel beats cuBLAS), else cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import ops
from ..kernels.decode_linear import decode_linears_serve
from .swap import STATE_ATTR, swap_forward

_GROUPED = ("q_proj", "k_proj", "v_proj")


@dataclass(eq=False)
class ProjectionGroup:
    """q_proj's launch result, until k_proj and v_proj take theirs."""

    input: torch.Tensor | None = None
    waiting: dict[str, torch.Tensor] = field(default_factory=dict)  # "k_proj"/"v_proj" -> output

    def clear(self) -> None:
        self.input = None
        self.waiting = {}


@dataclass(frozen=True, eq=False)
class ProjectionState:
    original_forward: object
    role: str  # "q_proj" (leads its group), "k_proj", "v_proj", or "o_proj" (alone)
    group: ProjectionGroup
    followers: tuple[nn.Linear, ...] = ()  # q_proj's: k_proj and v_proj


def _served(x: torch.Tensor, modules: tuple[nn.Linear, ...]) -> bool:
    return not any(m.training for m in modules) and decode_linears_serve(x, [m.weight for m in modules], [m.bias for m in modules])


def _launch(x: torch.Tensor, modules: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    return ops.decode_linears(x, [m.weight for m in modules], [m.bias for m in modules])


def lead_projection_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """q_proj: q, k and v in one launch; k and v wait for the next calls of k_proj and v_proj."""
    state: ProjectionState = getattr(self, STATE_ATTR)
    group = state.group
    modules = (self, *state.followers)
    if not _served(x, modules):
        group.clear()
        return state.original_forward(self, x)
    q, k, v = _launch(x, modules)
    group.input = x
    group.waiting = {"k_proj": k, "v_proj": v}
    return q


def follower_projection_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """k_proj / v_proj: the output q_proj's launch made for this very input, else computed here."""
    state: ProjectionState = getattr(self, STATE_ATTR)
    group = state.group
    if group.input is x and state.role in group.waiting:
        out = group.waiting.pop(state.role)
        if not group.waiting:
            group.clear()
        return out
    return solo_projection_forward(self, x)


def solo_projection_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """o_proj (and a follower on its own): one linear on the kernel where it serves (tuned data for the
    shape), else the stock forward."""
    state: ProjectionState = getattr(self, STATE_ATTR)
    if not _served(x, (self,)):
        return state.original_forward(self, x)
    return _launch(x, (self,))[0]


def _linear(module: nn.Module | None) -> bool:
    return type(module) is nn.Linear  # not a subclass: LoRA, quantized and other linears keep their forward


def patch_projections(model: nn.Module) -> list[str]:
    """Swap the q/k/v projections (and o_proj) of every module with q_proj, k_proj and v_proj nn.Linear
    children reading one hidden size; returns those modules' names."""
    patched = []
    for name, module in model.named_modules():
        grouped = [getattr(module, role, None) for role in _GROUPED]
        if not all(_linear(m) for m in grouped) or len({m.in_features for m in grouped}) != 1:
            continue
        q, k, v = grouped
        group = ProjectionGroup()
        swap_forward(q, lead_projection_forward, ProjectionState(nn.Linear.forward, "q_proj", group, (k, v)))
        for role, follower in (("k_proj", k), ("v_proj", v)):
            swap_forward(follower, follower_projection_forward, ProjectionState(nn.Linear.forward, role, group))
        if _linear(getattr(module, "o_proj", None)):
            swap_forward(module.o_proj, solo_projection_forward, ProjectionState(nn.Linear.forward, "o_proj", ProjectionGroup()))
        patched.append(name)
    return patched
