"""One offloaded MoE layer's forward: cached experts on the GPU side, each miss on the CPU or fetched.

Per forward (all sizes on the host after one sync that brings the routing over):

1. The router's choices are looked up in the layer's slots: hits, and misses split by the miss
   policy into CPU work and fetches (`miss_cost`).
2. The CPU share starts on the worker thread, on the rows of the tokens routed to CPU experts.
3. Fetches are copied into slots on the copy lane; the fused kernel runs over the slot table
   (expert ids remapped to slot ids, -1 for the experts it doesn't serve) after the copies. More
   fetches than free slots run in waves that reuse the slots, each wave's copies after the last
   kernel that read them.
4. The next layer's likely experts (its router run on this layer's input) are prefetched, as many
   as the copy lane has spare time for, unless that layer's predictions have mostly been wrong lately
   (random routing, or a router that doesn't agree with its neighbour's input): then a copy would
   take the lane from demand fetches and a slot from a cached expert for nothing.
5. The CPU result is added in; the output is summed in float32 and cast once.

With `OffloadOptions.miss_drop_threshold`, step 1 first drops, per token, the missed experts under
the threshold (`miss_drop`); the rest of the forward sees the routing without them, and the kernels
get the renormalised weights of the tokens that lost one. With `host_dtype="int4"` the CPU share
reads the layer's int4 host copies (`host_int4`).

Zero-copy forwards (`OffloadOptions.zero_copy`, decode steps) skip all of that: one fused-kernel call
over the cache's address table reads every routed expert where it is, cached experts from their
slots and the others from pinned host memory over PCIe (one token: once per pair; several: each
expert they share once, `kernels.address_path`). Nothing comes to the host: lookups and hits (one
per routed pair) and the experts read from host memory are counted on the device, and the slots
stay as the last prefill left them. With no host work, a zero-copy forward can be captured in a CUDA
graph: every other forward leaves its cache's address table current as it ends, since a replay
runs none of this Python.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from .. import kernels
from .cpu_experts import CpuExpertsWorker, plan_cpu_job
from .expert_cache import LOOKUP, ExpertCache
from .host_int4 import Int4Experts
from .miss_cost import (
    CopyLaneClock,
    CpuTimeCorrection,
    MissCostModel,
    MissPolicy,
    split_misses,
)
from .miss_drop import drop_missed
from .stats import LayerOffloadStats
from .transfers import DeviceLanes


class PrefetchSettings(Protocol):
    prefetch: bool
    prefetch_min_accuracy: float


class LayerServices(Protocol):
    """What an offloaded layer uses of the engine that owns every layer (`engine.OffloadEngine`)."""

    lanes: DeviceLanes
    cpu_worker: CpuExpertsWorker
    cost_model: MissCostModel | None
    copy_clock: CopyLaneClock
    cpu_correction: CpuTimeCorrection
    miss_policy: MissPolicy
    options: PrefetchSettings
    miss_drop_threshold: float  # 0: off

    def layer_stats(self, index: int) -> LayerOffloadStats: ...
    def zero_copy_counter(self, index: int) -> torch.Tensor: ...
    def expert_use(self, index: int) -> torch.Tensor | None: ...
    def next_layer(self, index: int) -> OffloadedLayer | None: ...
    def prefetch_limit(self, top_k: int) -> int: ...
    def zero_copy_serves(self, hidden: torch.Tensor) -> bool: ...
    def check_workload(self, num_tokens: int) -> None: ...


NOT_COPYABLE = (
    "hf_moe_accel: a model accelerated with expert offload (gpu_memory=...) can't be pickled (pickle, torch.save, "
    "multiprocessing) or deep-copied: its experts live in pinned host memory and GPU slots that the offload engine "
    "owns, beside a worker thread and CUDA streams, none of which a copy could take along. Call "
    "hf_moe_accel.unpatch(model) first (every weight goes back where it was), pickle or copy the stock model, then "
    "accelerate() it again."
)


class RefusesCopies:
    """Pickling or deep-copying this object raises a TypeError (the type pickle raises for what it can't
    write) that says what to do, instead of one about a thread's queue deep inside it."""

    def __reduce_ex__(self, protocol: int) -> tuple:
        raise TypeError(NOT_COPYABLE)

    def __deepcopy__(self, memo: dict) -> RefusesCopies:
        raise TypeError(NOT_COPYABLE)


# Weight of the newest forward in a layer's moving average of prediction accuracy.
_ACCURACY_SMOOTHING = 0.2
# Up to this many tokens, the hidden states come to the host with the routing (one transfer); above,
# only the rows the CPU experts need, after the split.
_HIDDEN_TO_HOST_TOKENS = 256


class OffloadedLayer(RefusesCopies):
    """One MoE layer's offloaded forward, bound into its experts module (so pickling that module meets it)."""

    def __init__(self, index: int, name: str, cache: ExpertCache, router_weight: torch.Tensor | None, top_k: int,
                 engine: LayerServices) -> None:
        self.index = index
        self.name = name
        self.cache = cache
        self.router_weight = router_weight  # this layer's router linear [E, H], to predict its routing a layer early
        self.top_k = top_k
        self.engine = engine
        self.prefetched_experts: list[int] | None = None  # the experts prefetch picked for this layer's next forward
        self.prefetch_accuracy = 1.0  # moving average; starts trusting the predictions
        self.host_int4: Int4Experts | None = None  # int4 host copies the CPU misses read (host_dtype="int4")
        self.drop_renormalises = False  # whether miss_drop_threshold rescales the kept weights (the family's rule)

    # Inference only: slots and host copies never join an autograd graph. Under torch.compile
    # (compile_decode) the layer runs as it is: its host work and counters are Python.
    @torch.compiler.disable
    @torch.no_grad()
    def forward(self, module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if module.training:
            raise RuntimeError("offloaded experts run inference only (no backward through the cache): call model.eval()")
        engine, cache = self.engine, self.cache
        stats = engine.layer_stats(self.index)
        num_tokens, hidden_size = hidden.shape
        stats.forwards += 1
        stats.tokens += num_tokens
        if num_tokens == 0:
            return hidden.new_zeros(0, hidden_size)
        if engine.zero_copy_serves(hidden):
            stats.zero_copy_forwards += 1
            return self._run_zero_copy(hidden, top_k_index, top_k_weights)
        out = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=hidden.device)
        engine.check_workload(num_tokens)
        engine.copy_clock.layer_started(self.index)
        next_layer = engine.next_layer(self.index)
        predicted = next_layer.guess_experts(hidden) if next_layer is not None else None

        # The one sync: routing (and the prediction, and for a few tokens the hidden states) to the host.
        to_host = [top_k_index, top_k_weights]
        if num_tokens <= _HIDDEN_TO_HOST_TOKENS:
            to_host.append(hidden)
        if predicted is not None:
            to_host.append(predicted)
        host = engine.lanes.to_host(to_host)
        stats.d2h_bytes += sum(t.numel() * t.element_size() for t in to_host)
        ids, routing = host[0].to(torch.int64), host[1].to(torch.float32)
        if engine.miss_drop_threshold > 0:
            ids, routing, top_k_weights = self._drop_misses(ids, host[1], top_k_weights, stats)
        hidden_host = host[2] if num_tokens <= _HIDDEN_TO_HOST_TOKENS else None
        predicted_host = host[-1] if predicted is not None else None

        # Pairs without an expert (-1: dropped by an expert threshold) point at a sentinel column E.
        num_experts = cache.num_experts
        routed = ids >= 0
        ids = torch.where(routed, ids, num_experts)
        routing = torch.where(routed, routing, 0.0)
        flat = ids.view(-1)
        tokens_per_expert = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
        touched = tokens_per_expert.nonzero().view(-1)
        mass = torch.zeros(num_experts + 1, dtype=torch.float64).index_add_(0, flat, routing.view(-1).double())
        cache.policy.record(touched, tokens_per_expert[touched], mass[touched])
        is_hit = cache.slot_of_expert[touched] >= 0
        hits, misses = touched[is_hit], touched[~is_hit]
        hit_list = hits.tolist()
        stats.lookups += touched.numel()
        stats.hits += len(hit_list)
        stats.prefetch_hits += len(cache.prefetched_unused.intersection(hit_list))
        touched_list = touched.tolist()
        cache.prefetched_unused.difference_update(touched_list)
        if self.prefetched_experts is not None:
            self._score_prediction(set(touched_list), stats)

        hit_slots = set(cache.slot_of_expert[hits].tolist())
        miss_tokens = tokens_per_expert[misses].tolist()
        fetch = split_misses(engine.miss_policy, engine.cost_model, miss_tokens, can_fetch=cache.num_slots > 0,
                             copy_backlog_s=engine.copy_clock.backlog_s(), cpu_scale=engine.cpu_correction.scale)
        on_cpu = torch.zeros(num_experts + 1, dtype=torch.bool)
        on_cpu[misses[~torch.tensor(fetch, dtype=torch.bool)]] = True
        # The busiest fetched experts go last, so they are the ones left in the slots.
        to_fetch = [e for _, e in sorted((n, e) for n, e, f in zip(miss_tokens, misses.tolist(), fetch) if f)]
        stats.fetched += len(to_fetch)
        stats.cpu_experts += len(fetch) - len(to_fetch)
        costs = engine.cost_model
        cpu_calibrated_s = sum(costs.cpu_s(n) for n, f in zip(miss_tokens, fetch) if not f) if costs is not None else 0.0

        cpu_work = self._start_cpu_work(hidden, hidden_host, ids, routing, on_cpu, stats) if on_cpu.any() else None
        if hit_list or to_fetch:
            self._run_on_slots(hidden, ids, top_k_weights, hits, hit_slots, to_fetch, out, stats)
        if predicted is not None:
            next_layer.prefetch(predicted_host)
        if cpu_work is not None:
            rows, future = cpu_work
            cpu_out, seconds = future.result()
            stats.cpu_expert_s += seconds
            stats.cpu_calibrated_s += cpu_calibrated_s
            engine.cpu_correction.observe(cpu_calibrated_s, seconds)
            stats.h2d_bytes += cpu_out.numel() * cpu_out.element_size()
            out.index_add_(0, rows, engine.lanes.to_device(cpu_out))
        if cache.by_address and cache.addresses_stale:  # current before any replay of a zero-copy graph reads it
            engine.lanes.compute_wait(cache.ready)
            cache.device_addresses()
        return out.to(hidden.dtype)

    def _run_zero_copy(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        cache, lanes = self.cache, self.engine.lanes
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            # Replays run none of this: the tables must be current already (every other forward leaves
            # them so), and events recorded outside a capture can't be waited on inside it.
            if cache.addresses_stale:
                raise RuntimeError(f"{self.name}: expert address table out of date at capture")
            cache.read_by_graph = True
        else:
            lanes.compute_wait(cache.ready)  # slots being filled are read only once their copies are in
        addresses = cache.device_addresses()
        path = kernels.address_path(hidden.shape[0])
        routed_pairs = top_k_index.remainder(cache.num_experts + 1).view(-1)  # -1 (no expert) -> the table's 0 at E
        if self.engine.miss_drop_threshold > 0:  # on the device: a cached expert's lookup value is above LOOKUP
            missed = cache.lookup_values()[routed_pairs].view_as(top_k_index) == LOOKUP
            top_k_index, top_k_weights, dropped = drop_missed(top_k_index, top_k_weights, missed,
                                                              self.engine.miss_drop_threshold, self.drop_renormalises)
            self.engine.zero_copy_counter(self.index)[2].add_(dropped.sum())
            routed_pairs = top_k_index.remainder(cache.num_experts + 1).view(-1)
        self._count_zero_copy(routed_pairs, per_pair=path == "decode")
        if (use := self.engine.expert_use(self.index)) is not None:  # for the refill between decode steps
            use.index_add_(0, routed_pairs, torch.ones_like(routed_pairs))
        out = kernels.fused_experts_at(hidden, cache.slots, addresses, top_k_index, top_k_weights, path=path)
        if not capturing:
            cache.last_read = lanes.compute_mark()  # a later install waits for this read
        return out

    def _count_zero_copy(self, routed_pairs: torch.Tensor, per_pair: bool) -> None:
        """Add a zero-copy forward's lookups, hits and experts read from host memory to the device
        counters: the decode path reads a missed expert once per pair, the grouped one once per forward
        (strictly, once per BLOCK_M of its pairs: a decode batch seldom routes a block's worth to one)."""
        values = self.cache.lookup_values()  # LOOKUP (+ 1 if cached) per expert, 0 at the sentinel E
        pair_values = values[routed_pairs]
        counter = self.engine.zero_copy_counter(self.index)
        counter[0].add_(pair_values.sum())
        # grouped: each touched expert's value once (pairs sharing an expert write the same value)
        read = pair_values if per_pair else torch.zeros_like(values).scatter_(0, routed_pairs, pair_values)
        counter[1].add_((read == LOOKUP).sum())

    def _drop_misses(self, ids: torch.Tensor, host_weights: torch.Tensor, top_k_weights: torch.Tensor,
                     stats: LayerOffloadStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop the missed experts under miss_drop_threshold (host routing, before any lookup) -> (ids,
        float32 routing, the kernels' weights: new ones on the device only where a token lost an expert)."""
        missed = (ids >= 0) & (self.cache.slot_of_expert[ids.clamp(min=0)] < 0)
        ids, weights, dropped = drop_missed(ids, host_weights, missed, self.engine.miss_drop_threshold,
                                            self.drop_renormalises)
        count = int(dropped.sum())
        if count:
            stats.miss_dropped += count
            stats.h2d_bytes += weights.numel() * weights.element_size()
            top_k_weights = self.engine.lanes.to_device(weights)
        return ids, weights.to(torch.float32), top_k_weights

    def _start_cpu_work(self, hidden, hidden_host, ids, routing, on_cpu, stats):
        job = plan_cpu_job(ids, routing, on_cpu)
        rows = self.engine.lanes.to_device(job.tokens)
        stats.h2d_bytes += rows.numel() * rows.element_size()
        if hidden_host is not None:
            x = hidden_host[job.tokens]
        else:  # many tokens: only the rows the CPU needs come over
            x = hidden.index_select(0, rows).cpu()
            stats.d2h_bytes += x.numel() * x.element_size()
        costs = self.engine.cost_model
        upcast_from_tokens = costs.upcast_from_tokens if costs is not None else math.inf
        return rows, self.engine.cpu_worker.submit(x, self.cache.host, job, upcast_from_tokens, self.host_int4)

    def _run_on_slots(self, hidden, ids, top_k_weights, hits, hit_slots, to_fetch, out, stats) -> None:
        """The fused kernel over the slots: the hits with as many fetches as the other slots hold, then
        the remaining fetches in waves over all the slots, each wave copied in after the last kernel."""
        cache, lanes = self.cache, self.engine.lanes
        remaining, keep, first = list(to_fetch), hit_slots, True
        while first or remaining:
            slots = cache.choose_slots(min(len(remaining), cache.num_slots - len(keep)), keep=keep)
            wave, remaining = remaining[: len(slots)], remaining[len(slots) :]
            table = torch.full((cache.num_experts + 1,), -1, dtype=torch.int64)  # the sentinel column stays -1
            if first:
                table[hits] = cache.slot_of_expert[hits]
            table[wave] = torch.tensor(slots, dtype=torch.int64)
            slot_ids = lanes.to_device(table[ids])
            stats.h2d_bytes += slot_ids.numel() * slot_ids.element_size() + self.install(list(zip(slots, wave)))
            lanes.compute_wait(cache.ready)
            out += kernels.fused_experts(hidden, cache.slots, slot_ids, top_k_weights).float()
            cache.last_read = lanes.compute_mark()
            keep, first = set(), False

    def _score_prediction(self, routed: set[int], stats) -> None:
        """Fold how many of the experts picked for this forward it routed to into the moving average."""
        picked, self.prefetched_experts = self.prefetched_experts, None
        if not picked:
            return
        right = len(routed.intersection(picked))
        stats.predicted += len(picked)
        stats.predicted_routed += right
        self.prefetch_accuracy += _ACCURACY_SMOOTHING * (right / len(picked) - self.prefetch_accuracy)

    def install(self, assignments: list[tuple[int, int]]) -> int:
        """Copy each (slot, expert) into this layer's cache on the copy lane; returns the bytes copied."""
        self.engine.copy_clock.queued(len(assignments))
        return self.cache.install(self.engine.lanes, assignments)

    def guess_experts(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """This layer's likely experts [T, k] for the previous layer's MoE input (its router, a layer early)."""
        if self.router_weight is None or not self.engine.options.prefetch or self.cache.num_slots == 0:
            return None
        logits = F.linear(hidden.to(self.router_weight.dtype), self.router_weight)
        return logits.topk(self.top_k, dim=-1).indices

    def prefetch(self, predicted: torch.Tensor) -> None:
        """Copy the most-predicted experts that aren't cached into slots (never evicting a predicted one),
        while this layer's recent predictions have come true often enough."""
        cache = self.cache
        counts = torch.bincount(predicted.view(-1), minlength=cache.num_experts)
        chosen = counts.nonzero().view(-1)
        ranked = chosen[torch.argsort(counts[chosen], descending=True, stable=True)]
        ranked = ranked[: self.engine.prefetch_limit(self.top_k)]
        self.prefetched_experts = ranked.tolist()  # scored when this layer runs
        stats = self.engine.layer_stats(self.index)
        if self.prefetch_accuracy < self.engine.options.prefetch_min_accuracy:
            stats.prefetch_paused += 1
            return
        # only as many as the copy lane has spare time for: prefetch must not delay demand fetches
        wanted = ranked[cache.slot_of_expert[ranked] < 0].tolist()[: self.engine.copy_clock.spare_copies()]
        if not wanted:
            return
        slots = cache.choose_slots(len(wanted), protect=set(self.prefetched_experts))
        assignments = list(zip(slots, wanted))
        stats.h2d_bytes += self.install(assignments)
        stats.prefetched += len(assignments)
        cache.prefetched_unused.update(e for _, e in assignments)
