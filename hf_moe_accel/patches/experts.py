"""The accelerated forward for experts modules that follow Transformers' experts layout.

Transformers' `use_experts_implementation` decorator stores layout flags on each experts
module (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`); together with the
activation they fully describe the computation, so one forward serves every such family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import ops
from ..kernels.spec import Activation, ExpertWeights
from .swap import STATE_ATTR, swapped_state

# Activation modules of `transformers.activations` (and torch) by class name: names are
# stable across the supported Transformers versions, classes may move.
_ACTIVATION_BY_CLASS_NAME = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}


# Plain functions some families store as `act_fn` (LFM2-MoE: F.silu).
_ACTIVATION_BY_FUNCTION = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu"}


def activation_from_act_fn(experts: nn.Module) -> Activation | None:
    """The Activation matching `experts.act_fn`, or None when the kernels don't know it."""
    act_fn = getattr(experts, "act_fn", None)
    if act_fn in _ACTIVATION_BY_FUNCTION:
        return Activation(_ACTIVATION_BY_FUNCTION[act_fn])
    if isinstance(act_fn, nn.GELU) and act_fn.approximate == "tanh":
        return Activation("gelu_tanh")
    if getattr(act_fn, "use_gelu_python", False):  # transformers' python GELU: same erf formula
        return Activation("gelu")
    kind = _ACTIVATION_BY_CLASS_NAME.get(type(act_fn).__name__)
    return Activation(kind) if kind is not None else None


def expert_weights(experts: nn.Module, activation: Activation) -> ExpertWeights:
    """Views (no copies) of the module's expert tensors, described for the kernels."""
    gate_up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    gate_up_bias = None
    if experts.has_bias:
        gate_up_bias = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
    return ExpertWeights(
        gate_up=gate_up,
        down=experts.down_proj,
        gate_up_bias=gate_up_bias,
        down_bias=experts.down_proj_bias if experts.has_bias else None,
        transposed=experts.is_transposed,
        interleaved=not experts.is_concatenated,
        has_gate=experts.has_gate,
        activation=activation,
    )


@dataclass(frozen=True)
class ExpertsState:
    original_forward: object
    activation: Activation


def experts_state(module: nn.Module) -> ExpertsState | None:
    """The fused-experts state of an experts module `patch_model` swapped, or None."""
    state = swapped_state(module)
    return state if isinstance(state, ExpertsState) else None


def accelerated_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    state: ExpertsState = getattr(self, STATE_ATTR)
    if self.training:  # the kernels have no backward: training keeps the stock path
        return state.original_forward(self, hidden_states, top_k_index, top_k_weights)
    weights = expert_weights(self, state.activation)
    if torch.compiler.is_compiling():  # one opaque op in the traced graph; eager calls skip the op dispatch
        return ops.fused_experts(hidden_states, weights, top_k_index, top_k_weights)
    return kernels.fused_experts(hidden_states, weights, top_k_index, top_k_weights)
