"""Our fused experts as a Transformers experts implementation, registered as EXPERTS_IMPLEMENTATION.

Transformers' `use_experts_implementation` decorator stores layout flags on each experts
module (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`); together with the
activation they fully describe the computation, so one forward serves every such family.

The decorated forward calls `ALL_EXPERTS_FUNCTIONS.get_interface(config._experts_implementation, ...)`
on every call, with the experts module as `self`. `fused_experts_forward` is registered there (at
import, process-wide, as patches/attention.py registers the decode attention), and `patch_model`
writes its name into the patched experts' configs and keeps each patched module's `ExpertsState` in
the module's `__dict__`. So the config says what runs, and a user's
`model.set_experts_implementation("grouped_mm" | "batched_mm" | "eager")` runs stock experts, as in
stock; setting it back to EXPERTS_IMPLEMENTATION runs ours again. A module whose config reads our
name but that `patch_model` didn't patch (another model built from the same config object) runs
the stock implementation the config had before, with one warning.

Experts that Transformers' fine-grained FP8 quantizer built (`FP8Experts`) dispatch through an
interface of their own, ALL_FP8_EXPERTS_FUNCTIONS; `serve_interface` registers the same function
there, so one name runs our kernels for both. Block-scaled weights (FP8Experts', or those
`expert_dtype="fp8"` made at patch time: patches/expert_dtype.py) carry float32 `<weight>_scale_inv`
parameters, Transformers' naming, which `expert_weights` hands to the kernels as `BlockScales`.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .. import kernels
from ..kernels import ops
from ..kernels.experts_fp8_reference import FP8_DTYPE
from ..kernels.spec import Activation, BlockScales, ExpertWeights
from .implementations import stock_name
from .swap import STATE_ATTR, swapped_state

if TYPE_CHECKING:
    from .expert_dtype import QuantizedExperts

logger = logging.getLogger("hf_moe_accel")

EXPERTS_IMPLEMENTATION = "hf_moe_accel"
# What Transformers runs for experts when nothing says otherwise (a config built with our name).
_STOCK_DEFAULT = "grouped_mm"

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


def gate_up_name(experts: nn.Module) -> str:
    """The first projection's parameter name: gate and up in one tensor, or up alone without a gate."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def block_scales(experts: nn.Module) -> BlockScales | None:
    """The block scales of float8 expert weights (`<weight>_scale_inv`, Transformers' naming), or None
    for weights in a float dtype (Transformers' quantizer leaves weights it can't tile unquantized).
    The block size is the FP8Experts' `block_size`, or the one `expert_dtype` quantized with."""
    gate_up = getattr(experts, gate_up_name(experts))
    stored = {gate_up.dtype == FP8_DTYPE, experts.down_proj.dtype == FP8_DTYPE}
    if stored == {False}:
        return None
    if stored != {True}:
        raise ValueError(f"{type(experts).__name__}: gate_up {gate_up.dtype} and down {experts.down_proj.dtype}; "
                         "the fused kernels take both projections block-quantized or neither")
    state = experts_state(experts)
    quantized = state.quantized if state is not None else None
    block = quantized.block_size if quantized is not None else getattr(experts, "block_size", None)
    if block is None or len(block) != 2:
        raise ValueError(f"{type(experts).__name__}: block_size {block!r}; the fused kernels read (rows, columns) blocks only")
    gate_up_scale = getattr(experts, f"{gate_up_name(experts)}_scale_inv")
    return BlockScales(gate_up_scale, experts.down_proj_scale_inv, (int(block[0]), int(block[1])))


def expert_weights(experts: nn.Module, activation: Activation) -> ExpertWeights:
    """Views (no copies) of the module's expert tensors, described for the kernels."""
    gate_up = getattr(experts, gate_up_name(experts))
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
        scales=block_scales(experts),
    )


@dataclass(frozen=True)
class ExpertsState:
    """What a patched experts module keeps in its `__dict__` (STATE_ATTR)."""

    activation: Activation
    previous: str | None  # the config's experts implementation before accelerate(): train() runs it
    quantized: QuantizedExperts | None = None  # what expert_dtype changed on the module, to undo it

    def __reduce_ex__(self, protocol: int) -> tuple:
        return type(None), ()  # a pickled accelerated model loads as a stock one (patches/swap.py)

    def __deepcopy__(self, memo: dict) -> ExpertsState:
        if self.quantized is None:
            return self  # frozen: a deep copy of the model shares it
        return replace(self, quantized=copy.deepcopy(self.quantized, memo))  # the copy restores its own originals


def experts_state(module: nn.Module) -> ExpertsState | None:
    """The fused-experts state of an experts module `patch_model` patched, or None."""
    state = swapped_state(module)
    return state if isinstance(state, ExpertsState) else None


def _interface_of(forward: object) -> ExpertsInterface | None:
    """The experts interface `forward` dispatches through, when it is the decorator's dispatch."""
    code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None)
    if code is None or not closure or not hasattr(forward, "__wrapped__"):
        return None
    cell = dict(zip(code.co_freevars, closure)).get("experts_interface")
    interface = cell.cell_contents if cell is not None else None
    return interface if isinstance(interface, ExpertsInterface) else None


def dispatch_interface(module: nn.Module) -> ExpertsInterface | None:
    """The experts interface the module's forward looks its implementation up in (ALL_EXPERTS_FUNCTIONS,
    Transformers' FP8 experts' ALL_FP8_EXPERTS_FUNCTIONS, ...), or None for a forward of its own."""
    return _interface_of(getattr(type(module), "forward", None))


def fp8_experts_interface() -> ExpertsInterface | None:
    """ALL_FP8_EXPERTS_FUNCTIONS where Transformers' FP8 integration is loaded (FP8 experts exist only then)."""
    module = sys.modules.get("transformers.integrations.finegrained_fp8")
    return getattr(module, "ALL_FP8_EXPERTS_FUNCTIONS", None)


def dispatches_through_interface(module: nn.Module) -> bool:
    """Whether the module's forward is the decorator's dispatch through an interface that can hold our
    implementation: ALL_EXPERTS_FUNCTIONS, or ALL_FP8_EXPERTS_FUNCTIONS for Transformers' FP8 experts.
    A subclass overriding forward, or another interface, can't reach it."""
    interface = dispatch_interface(module)
    return interface is not None and (interface is ALL_EXPERTS_FUNCTIONS or interface is fp8_experts_interface())


def serve_interface(interface: ExpertsInterface) -> None:
    """Register EXPERTS_IMPLEMENTATION in `interface`'s class (process-wide, as Transformers' own
    `register` does); ALL_EXPERTS_FUNCTIONS has it from import."""
    if EXPERTS_IMPLEMENTATION not in interface:
        type(interface).register(EXPERTS_IMPLEMENTATION, fused_experts_forward)


def _eager_forward(experts_class: type) -> Callable[..., torch.Tensor]:
    """The class's own forward under the decorator's dispatch. Transformers decorates FP8Experts once per
    quantized experts module, each time around the last, so the dispatch may be nested."""
    forward = experts_class.forward
    while _interface_of(forward) is not None:
        forward = forward.__wrapped__
    return forward


def _runnable(name: str | None) -> str:
    """The implementation Transformers runs for `name`: "eager" for none, its default for ours."""
    if name == EXPERTS_IMPLEMENTATION:
        return _STOCK_DEFAULT
    return "eager" if name is None else name


def stock_experts_forward(module: nn.Module, name: str | None) -> Callable[..., torch.Tensor]:
    """The forward Transformers runs for the experts implementation `name` (ours: its default), looked up
    in the interface the module dispatches through."""
    eager = _eager_forward(type(module))
    name = _runnable(name)
    interface = dispatch_interface(module) or ALL_EXPERTS_FUNCTIONS
    return eager if name == "eager" else interface.get_interface(name, eager)


_warned_unpatched: set[str] = set()


def _warn_unpatched_once(module: nn.Module, fallback: str | None) -> None:
    name = type(module).__name__
    if name not in _warned_unpatched:
        _warned_unpatched.add(name)
        logger.warning(
            "hf_moe_accel: a %s reads experts implementation %r from its config but was not patched by accelerate() "
            "(a config object shared with an accelerated model?): it runs %r", name, EXPERTS_IMPLEMENTATION, _runnable(fallback),
        )


def fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The EXPERTS_IMPLEMENTATION: both experts GEMMs in the fused kernels."""
    state = getattr(self, STATE_ATTR, None)
    if not isinstance(state, ExpertsState):
        fallback = stock_name(self.config._experts_implementation)
        _warn_unpatched_once(self, fallback)
        return stock_experts_forward(self, fallback)(self, hidden_states, top_k_index, top_k_weights)
    if self.training:  # the kernels have no backward: training runs what the config said before
        return stock_experts_forward(self, state.previous)(self, hidden_states, top_k_index, top_k_weights)
    weights = expert_weights(self, state.activation)
    if torch.compiler.is_compiling():  # one opaque op in the traced graph; eager calls skip the op dispatch
        return ops.fused_experts(hidden_states, weights, top_k_index, top_k_weights)
    return kernels.fused_experts(hidden_states, weights, top_k_index, top_k_weights)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, fused_experts_forward)
