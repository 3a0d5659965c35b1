"""Uniform routing, for expert-cache benchmarks on random-weight models.

A random-weight model's routing barely depends on the token: in decode its residual stream is
dominated by attention outputs that change little from one step to the next, so the same experts
win every step (a hit rate far above the cached share of the experts, even in sampled decode:
`python scripts/bench_offload.py --routing model`; figures in docs/BENCHMARKS.md), and a cache
benchmark on it measures nothing. Inside `uniform_routing`,
every MoE layer's experts receive, instead of the router's choice, k distinct experts drawn
uniformly per token with equal weights: the routing the placement predictor assumes, with a hit
rate near the cached share of the experts. The outputs are no longer the model's: speed only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..kernels.spec import Activation, is_experts_module
from ..patches.experts import expert_weights

# Transformers' experts modules are called as experts(hidden_states, top_k_index, top_k_weights).
_ROUTING_ARGUMENTS = ("top_k_index", "top_k_weights")


@contextlib.contextmanager
def uniform_routing(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Within the block, each token's experts are k distinct ones drawn uniformly, each weighted 1/k,
    k the model's own; stock and accelerated models alike. The draws come from torch's default
    generators (`torch.manual_seed(seed)` on entry when a seed is given): the ones a CUDA graph
    registers, so replays draw afresh (a generator of our own would fail the capture)."""
    experts_modules = [m for m in model.modules() if is_experts_module(m)]
    if not experts_modules:
        raise ValueError(f"{type(model).__name__} has no Transformers experts modules to route")

    def draw(num_experts: int, index: torch.Tensor) -> torch.Tensor:
        scores = torch.rand(index.shape[0], num_experts, device=index.device)
        return scores.topk(index.shape[-1], dim=-1).indices.to(index.dtype)

    def hook_for(module: nn.Module):
        num_experts = expert_weights(module, Activation()).num_experts

        def replace_routing(_module, args, kwargs):
            args, kwargs = list(args), dict(kwargs)
            places = []  # (container, key) of each routing argument, as this call passed it
            for position, name in enumerate(_ROUTING_ARGUMENTS, start=1):
                if name in kwargs:
                    places.append((kwargs, name))
                elif len(args) > position:
                    places.append((args, position))
                else:
                    raise TypeError(f"{type(module).__name__} was called without {name}: can't replace its routing")
            (ids_in, ids_key), (weights_in, weights_key) = places
            index, weights = ids_in[ids_key], weights_in[weights_key]
            ids_in[ids_key] = draw(num_experts, index)
            weights_in[weights_key] = torch.full_like(weights, 1.0 / index.shape[-1])
            return tuple(args), kwargs

        return replace_routing

    if seed is not None:
        torch.manual_seed(seed)
    handles = [m.register_forward_pre_hook(hook_for(m), with_kwargs=True) for m in experts_modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
