"""Quality of the lossy offload options under one expert cache: `hf-moe-accel eval --gpu-memory ...`.

Rows: "offload" (the cache as it is: lossless, the reference for the others), "offload int4"
(`host_dtype="int4"`) and "offload miss_drop=X" (`miss_drop_threshold`), each measured as
`bench.quality.evaluate` measures a setting (perplexity, greedy agreement with stock's tokens).

The offload is simulated the same way for every row, so the rows differ only by the lossy option
and the cache is the same in all of them (it depends on the routing alone, never on timings):

- the slots are filled by prefetch only (each layer's most predicted experts, from its router run on
  the previous layer's input, with the model's trained routing), never held back by the copy lane
  (a cost model with free copies) or by poor predictions;
- every miss is served from host memory on the CPU (miss_policy="cpu"), the misses both lossy
  options act on: an upper bound of their effect where a real run fetches some misses instead. The
  first MoE layer, which nothing prefetches for, misses every expert;
- no zero-copy (int4 has no zero-copy path), and the forwards are those of the evaluation (windows
  of text, teacher-forced prompts), so hit rates are those of batched forwards.

Speed isn't measured here: the bench's offload preset runs are the place for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..api import accelerate, unpatch
from ..offload.engine import OffloadOptions, is_offloaded, offload_stats
from ..offload.host_int4 import HOST_DTYPES
from ..offload.miss_cost import MissCostModel
from ..offload.miss_drop import check_miss_drop_threshold
from .quality import (
    EvalConfig,
    ExpertCounter,
    add_relative_figures,
    greedy_agreement,
    perplexity,
    prepare_data,
)
from .timing import forced_greedy

# Copies cost nothing, so prefetch is never limited by the copy lane's (timed) spare time.
_FREE_COPIES = MissCostModel(fetch_s=0.0, cpu_base_s=0.0, cpu_per_token_s=0.0)
# Prefetch may fill every slot of a layer in one forward.
_ALL_PREDICTED = 1 << 30


@dataclass(frozen=True)
class OffloadEval:
    """The cache (budget, optional slots per layer) and the lossy options to measure under it."""

    gpu_memory: str | int
    slots_per_layer: int | None = None
    host_dtype: str | None = None
    miss_drop_thresholds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.host_dtype is not None and self.host_dtype not in HOST_DTYPES:
            raise ValueError(f"host_dtype must be one of {', '.join(HOST_DTYPES)}, got {self.host_dtype!r}")
        for threshold in self.miss_drop_thresholds:
            check_miss_drop_threshold(threshold)

    def settings(self) -> list[tuple[str, dict]]:
        """(row name, lossy OffloadOptions fields) per row, the lossless "offload" first."""
        rows = [("offload", {})]
        if self.host_dtype is not None:
            rows.append((f"offload {self.host_dtype}", {"host_dtype": self.host_dtype}))
        rows += [(f"offload miss_drop={t:g}", {"miss_drop_threshold": float(t)}) for t in self.miss_drop_thresholds]
        return rows

    def options(self, device: torch.device, **lossy) -> OffloadOptions:
        """The simulation's OffloadOptions (see the module's docstring) with `lossy` fields."""
        return OffloadOptions(device=device, miss_policy="cpu", prefetch=True, prefetch_experts=_ALL_PREDICTED,
                              prefetch_min_accuracy=0.0, cost_model=_FREE_COPIES, zero_copy=False,
                              slots_per_layer=self.slots_per_layer, **lossy)


def _offloaded(model: nn.Module, spec: OffloadEval, lossy: dict) -> nn.Module:
    device = next(model.parameters()).device
    accelerate(model, gpu_memory=spec.gpu_memory, offload=spec.options(device, **lossy), cuda_graphs=False)
    if not is_offloaded(model):
        unpatch(model)
        raise ValueError(f"gpu_memory={spec.gpu_memory} holds every expert of the model: nothing is offloaded "
                         "(give a smaller budget, or fewer slots per layer)")
    return model


def check_offload_eval(model: nn.Module, spec: OffloadEval) -> None:
    """Raises (ValueError/TypeError) where a row can't run on this model; leaves it stock."""
    for _, lossy in spec.settings():
        unpatch(_offloaded(model, spec, lossy))


def offload_rows(model: nn.Module, token_ids: torch.Tensor, config: EvalConfig, spec: OffloadEval,
                 full: dict) -> list[dict]:
    """One row per `spec.settings()`, with the relative figures against `full` (the accelerated full
    model); the model is left stock. experts_per_token counts the experts that ran: the routed ones
    less the dropped pairs."""
    data = prepare_data(token_ids, config, next(model.parameters()).device)
    reference = forced_greedy(model, data.prompts, config.new_tokens)  # stock greedy tokens
    rows = []
    for name, lossy in spec.settings():
        _offloaded(model, spec, lossy)
        try:
            with ExpertCounter().installed(model) as counter:
                ppl = perplexity(model, data.windows, config.batch)
            dropped = offload_stats(model).total.miss_dropped
            row = {"name": name, "accelerated": True, "top_k": None, "expert_threshold": None,
                   "gpu_memory": spec.gpu_memory, "host_dtype": lossy.get("host_dtype"),
                   "miss_drop_threshold": lossy.get("miss_drop_threshold"), "ppl": ppl,
                   "agreement": greedy_agreement(model, reference, config.prompt_len),
                   "experts_per_token": counter.per_token - dropped / max(counter.token_layers, 1)}
            total = offload_stats(model).total
            row.update(hit_rate=total.hit_rate, miss_dropped=total.miss_dropped)
        finally:
            unpatch(model)
        add_relative_figures(row, full)
        rows.append(row)
    return rows
