"""What the patcher must know about one model family that its experts layout flags don't say."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..kernels.spec import Activation, RoutingSpec

# Builds the RoutingSpec of one router module for router inputs of one dtype (the dtype matters
# where the stock router casts its weights to it, or scores in it); None keeps the stock forward
# for that router (for inputs of that dtype).
RoutingBuilder = Callable[[nn.Module, torch.dtype], "RoutingSpec | None"]

# How the stock router runs its linear layer (x: router input, W/b: the linear's weight/bias):
#   "input"   F.linear(x, W, b): logits in the model dtype (Qwen, OLMoE, GPT-OSS, Mixtral, ...).
#   "float32" F.linear(x.float(), W.float(), b.float()) (DeepSeek-V3, GLM-4-MoE, Ernie, ...).
#   "upcast"  F.linear(x, W, b).float(): model-dtype GEMM, logits returned in float32 (AFMoE, GraniteMoE).
#   "weight"  F.linear(x.to(W.dtype), W, b): runs in the weight's dtype (HunYuan keeps its gate in
#             float32; MiniMax-M2).
LogitsPrecision = Literal["input", "float32", "upcast", "weight"]


@dataclass(frozen=True)
class FamilyAdapter:
    """One family (or several sharing code), keyed by `config.model_type` of the experts' config.

    router_attr: the router's attribute name on the MoE block (the experts' parent module).
    routing:     `routing(router, input_dtype)` builds the RoutingSpec; None (or a None result for a
                 given router) keeps the family's own router forward, exact by construction, in front
                 of the fused experts.
    activation:  builds the Activation from the experts module; None derives it from the
                 experts' `act_fn` (only valid when the family keeps the default `_apply_gate`).
    logits:      how the router's linear layer runs (see LogitsPrecision).
    router_linear: dotted path, inside the router, of the module holding the router's `weight`
                 (and optional `bias`); "" is the router itself (AFMoE: "gate", HunYuan: "wg").
    correction_bias: dotted path, inside the router, of the selection-only expert bias used when the
                 spec has_correction_bias. Routers whose block passes that bias as the forward's second
                 argument (AFMoE, MiniMax-M2, HY-V3, LFM2-MoE) get it from there instead.
    """

    model_types: tuple[str, ...]
    router_attr: str = "gate"
    routing: RoutingBuilder | None = None
    activation: Callable[[nn.Module], Activation] | None = None
    logits: LogitsPrecision = "input"
    router_linear: str = ""
    correction_bias: str = "e_score_correction_bias"
