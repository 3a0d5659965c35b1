"""The accelerated router forward: the family's router linear, then one fused routing kernel."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import ops
from ..kernels.decode_linear import decode_linears_serve
from ..kernels.spec import RoutingSpec
from .adapter import FamilyAdapter, LogitsPrecision, RoutingBuilder
from .swap import STATE_ATTR, swap_forward

logger = logging.getLogger("hf_moe_accel")

# Router input dtypes a spec is prepared for at patch time (the model may be cast after patching);
# inputs of other dtypes run the stock router.
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RouterState:
    original_forward: Callable[..., object]
    # By the dtype of the router's input; None: that dtype runs the stock forward.
    specs: Mapping[torch.dtype, RoutingSpec | None]
    logits: LogitsPrecision
    router_linear: str
    correction_bias: str
    # Where the stock router puts (logits, weights, ids) in its output tuple: (0, 1, 2) for every
    # family in Transformers 5.23; GraniteMoE in 5.17 returned (ids, weights, logits).
    output_order: tuple[int, int, int]
    # The family's builder, kept to rebuild the specs for another top-k (`select_experts`).
    routing: RoutingBuilder


def _submodule_or_tensor(module: nn.Module, path: str) -> nn.Module | torch.Tensor:
    return functools.reduce(getattr, path.split("."), module) if path else module


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: LogitsPrecision) -> torch.Tensor:
    """The router's linear layer, run at the precision the stock router runs it; at a decode step's few
    tokens in one launch of the decode linear (`kernels.decode_linear`), which multiplies in float32."""
    # The launch needs x and the weight in one dtype: then "weight" (x cast to the weight's dtype) is "input".
    if decode_linears_serve(x, [weight], [bias]):
        out_dtype = torch.float32 if precision == "float32" else None
        logits = ops.decode_linears(x, [weight], [bias], out_dtype)[0]
        return logits.float() if precision == "upcast" else logits
    if precision == "float32":
        return F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    if precision == "weight":
        return F.linear(x.to(weight.dtype), weight, bias)
    logits = F.linear(x, weight, bias)
    return logits.float() if precision == "upcast" else logits


def accelerated_router_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """Same outputs as the stock router: (router_logits, top-k weights, top-k expert ids), in its order.

    A second positional argument is the expert bias of the routers whose MoE block passes it in
    (AFMoE, MiniMax-M2, HY-V3, LFM2-MoE); the other routers keep it as an attribute.
    """
    state: RouterState = getattr(self, STATE_ATTR)
    spec = state.specs.get(hidden_states.dtype)
    if self.training or spec is None:  # the kernels have no backward; some dtypes keep the stock path
        return state.original_forward(self, hidden_states, *args, **kwargs)
    linear = _submodule_or_tensor(self, state.router_linear)
    x = hidden_states.reshape(-1, linear.weight.shape[-1])
    logits = router_logits(x, linear.weight, getattr(linear, "bias", None), state.logits)
    correction_bias = None
    if spec.has_correction_bias:
        # Passed by the block (positionally in Transformers; a keyword under any name is accepted too),
        # else the router's own attribute.
        passed = args[0] if args else next(iter(kwargs.values()), None)
        correction_bias = passed if passed is not None else _submodule_or_tensor(self, state.correction_bias)
        correction_bias = correction_bias.reshape(-1)  # Ernie stores it as [1, E]
    # Traced (compile_decode): one opaque op; eager calls skip the op dispatch.
    weights, ids = (ops.route if torch.compiler.is_compiling() else kernels.route)(logits, spec, correction_bias)
    outputs: list[torch.Tensor] = [logits, weights, ids]
    for value, position in zip((logits, weights, ids), state.output_order):
        outputs[position] = value
    return tuple(outputs)


def stock_output_order(router: nn.Module, weight: torch.Tensor) -> tuple[int, int, int] | None:
    """Positions of (logits, weights, ids) in the stock router's output, or None when it doesn't return
    that triple (a plain nn.Linear router, a 4-tuple...), found by running the stock forward once on
    one zero token, flat [1, H] as most blocks pass it, else [1, 1, H] (AFMoE's router wants 3-D).
    The class's forward is called directly, so no hook sees the call; on a meta (offloaded) weight
    the probe runs on meta tensors and computes nothing."""
    num_experts, hidden_size = weight.shape
    params = list(inspect.signature(type(router).forward).parameters.values())[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # Routers given the expert bias by their block take it as a second argument.
    extra = (torch.zeros(num_experts, dtype=torch.float32, device=weight.device),) if len(positional) > 1 else ()
    out = None
    for shape in ((1, hidden_size), (1, 1, hidden_size)):
        try:
            with torch.no_grad():
                out = type(router).forward(router, torch.zeros(shape, dtype=weight.dtype, device=weight.device), *extra)
            break
        except Exception:  # a router the probe can't drive keeps its stock forward
            continue
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
        return None
    ids = [i for i, t in enumerate(out) if not t.is_floating_point()]
    if len(ids) != 1:
        return None
    floats = [i for i in range(3) if i != ids[0]]
    weights = [i for i in floats if out[i].shape == out[ids[0]].shape]
    if len(weights) != 1:
        return None
    logits = next(i for i in floats if i != weights[0])
    return logits, weights[0], ids[0]


def patch_router(router: nn.Module, adapter: FamilyAdapter) -> bool:
    """Swap in the fused routing forward; False when the family (or this router) keeps its own."""
    if adapter.routing is None:
        return False
    weight = getattr(_submodule_or_tensor(router, adapter.router_linear), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in _INPUT_DTYPES:
        return False  # a quantized router linear (e.g. FP8Linear) keeps its own forward
    order = stock_output_order(router, weight)
    if order is None:
        return False
    try:
        specs = _build_specs(router, adapter.routing)
    except (AttributeError, TypeError, ValueError) as error:
        # A router attribute the builder reads is gone (a newer Transformers?): keep the stock router
        # rather than fail halfway through patching the model.
        logger.warning("hf_moe_accel: keeping the stock %s: its routing builder failed (%r)", type(router).__name__, error)
        return False
    if specs[weight.dtype] is None:  # not expressible (for the dtype the model runs in): stock router
        return False
    state = RouterState(
        original_forward=type(router).forward,
        specs=specs,
        logits=adapter.logits,
        router_linear=adapter.router_linear,
        correction_bias=adapter.correction_bias,
        output_order=order,
        routing=adapter.routing,
    )
    swap_forward(router, accelerated_router_forward, state)
    return True


def _build_specs(router: nn.Module, routing: RoutingBuilder) -> dict[torch.dtype, RoutingSpec | None]:
    return {dtype: routing(router, dtype) for dtype in _INPUT_DTYPES}


def is_fused_router(module: nn.Module) -> bool:
    """Whether `module` is a router whose forward `patch_router` swapped for the fused one."""
    return isinstance(module.__dict__.get(STATE_ATTR), RouterState)


def router_specs(module: nn.Module) -> list[RoutingSpec]:
    """The routing specs a fused router computes (one per input dtype it serves); [] for any other module."""
    state = module.__dict__.get(STATE_ATTR)
    return [spec for spec in state.specs.values() if spec is not None] if isinstance(state, RouterState) else []


def select_experts(routers: Sequence[nn.Module], top_ks: Sequence[int | None], expert_threshold: float) -> None:
    """Make each fused router pick its `top_ks[i]` experts per token (None: its own top_k), then drop
    those whose normalised weight is under `expert_threshold` (0: none), as `RoutingSpec.expert_threshold`
    says. All or nothing: raises ValueError, changing no router, when a top-k doesn't fit its router.

    The specs are rebuilt by the family's builder from a router whose `top_k` reads the new value, so
    every rule that depends on k (e.g. the privacy filter's 1/k scale) is the stock router's with that k.
    The family's own specs come back with `unpatch`, which drops the state.
    """
    states = [_selected_state(router, top_k, expert_threshold) for router, top_k in zip(routers, top_ks, strict=True)]
    for router, state in zip(routers, states):
        object.__setattr__(router, STATE_ATTR, state)


def _selected_state(router: nn.Module, top_k: int | None, expert_threshold: float) -> RouterState:
    state: RouterState = router.__dict__[STATE_ATTR]
    own_top_k = router.top_k
    if top_k is not None:
        router.top_k = top_k
    try:
        specs = _build_specs(router, state.routing)
    finally:
        router.top_k = own_top_k
    for spec in specs.values():
        if spec is not None:
            _check_selection(spec, type(router).__name__)
    selected = {dtype: replace(spec, expert_threshold=expert_threshold) if spec else None for dtype, spec in specs.items()}
    return replace(state, specs=selected)


def _check_selection(spec: RoutingSpec, router_name: str) -> None:
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ValueError(f"top_k={spec.top_k} is out of range for {router_name}: it must be in [1, {spec.num_experts}]")
    eligible = spec.topk_group * (spec.num_experts // spec.n_group)
    if spec.n_group > 1 and spec.top_k > eligible:
        raise ValueError(
            f"top_k={spec.top_k} is out of range for {router_name}: its group-limited routing makes only "
            f"{eligible} experts eligible ({spec.topk_group} of {spec.n_group} groups)"
        )
