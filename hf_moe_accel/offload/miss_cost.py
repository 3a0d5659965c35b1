"""Where a missed expert runs: on the CPU, where its weights are, or fetched into a GPU slot.

A fetch costs the same whatever the expert's token count (its bytes over PCIe); CPU work grows
with the tokens. The copy lane and the CPU run at the same time, so the misses of one forward are
split to finish both lanes soonest: the busiest experts are placed first, each on the lane that
would then finish earlier (few tokens: CPU; many: fetch). Measured on the user's machine at
`accelerate()` time by `calibrate_miss_costs`.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .cpu_experts import compute_dtype, run_cpu_experts
from .expert_cache import ExpertCache, expert_tensors
from .host_int4 import Int4Experts
from .transfers import DeviceLanes

# "auto": the cost model decides per expert; "fetch": every miss fetched (the baseline the cost
# model is measured against); "cpu": misses always computed on the CPU (prefetch still fills slots).
MissPolicy = Literal["auto", "fetch", "cpu"]
MISS_POLICIES = ("auto", "fetch", "cpu")


@dataclass(frozen=True)
class MissCostModel:
    """Seconds to serve one missed expert: `fetch_s` to copy it into a slot, or on the CPU
    `cpu_base_s + cpu_per_token_s * tokens` in the weights' dtype, or `upcast_base_s +
    upcast_per_token_s * tokens` in float32 (`cpu_experts`), whichever is less."""

    fetch_s: float
    cpu_base_s: float
    cpu_per_token_s: float
    upcast_base_s: float = math.inf  # inf: never upcast (float32 weights, or not measured)
    upcast_per_token_s: float = 0.0

    def cpu_s(self, tokens: int) -> float:
        native = self.cpu_base_s + self.cpu_per_token_s * tokens
        return min(native, self.upcast_base_s + self.upcast_per_token_s * tokens)

    @property
    def upcast_from_tokens(self) -> float:
        """The fewest tokens from which the float32 way is the faster one (inf: never)."""
        if not math.isfinite(self.upcast_base_s):
            return math.inf
        if self.upcast_base_s + self.upcast_per_token_s < self.cpu_base_s + self.cpu_per_token_s:
            return 1
        saved_per_token = self.cpu_per_token_s - self.upcast_per_token_s
        if saved_per_token <= 0:
            return math.inf
        return math.floor((self.upcast_base_s - self.cpu_base_s) / saved_per_token) + 1

    def fetch_is_faster(self, tokens: int) -> bool:
        return self.fetch_s <= self.cpu_s(tokens)

    def split(self, tokens: list[int], copy_backlog_s: float = 0.0, cpu_scale: float = 1.0) -> list[bool]:
        """For each missed expert (its token count), True to fetch it, False to run it on the CPU;
        the copy lane may still be busy for `copy_backlog_s` (prefetches in flight), and CPU work
        takes `cpu_scale` times its calibrated time (`CpuTimeCorrection`)."""
        fetch = [False] * len(tokens)
        copy_lane, cpu_lane = copy_backlog_s, 0.0
        for i in sorted(range(len(tokens)), key=lambda i: -tokens[i]):
            cpu_s = cpu_scale * self.cpu_s(tokens[i])
            if copy_lane + self.fetch_s <= cpu_lane + cpu_s:
                fetch[i] = True
                copy_lane += self.fetch_s
            else:
                cpu_lane += cpu_s
        return fetch


class CpuTimeCorrection:
    """Measured over calibrated time of the CPU expert jobs run so far, as a moving average. The
    calibration times one expert with the machine otherwise idle; while decoding, the CPU shares
    host-memory bandwidth with the copy lane's transfers, so a job takes longer than calibrated, and a
    split on the calibrated figure alone would give the CPU more than it finishes in time. The two
    times side by side: `offload_stats(model)`'s cpu_expert_s against cpu_calibrated_s."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.scale = 1.0

    def observe(self, calibrated_s: float, measured_s: float) -> None:
        if calibrated_s > 0:
            self.scale += self.smoothing * (measured_s / calibrated_s - self.scale)


def split_misses(policy: MissPolicy, costs: MissCostModel | None, tokens: list[int], can_fetch: bool,
                 copy_backlog_s: float = 0.0, cpu_scale: float = 1.0) -> list[bool]:
    """True for the misses to fetch, by the miss policy (the CPU serves all when there is no slot)."""
    if not can_fetch or policy == "cpu":
        return [False] * len(tokens)
    if policy == "fetch":
        return [True] * len(tokens)
    return costs.split(tokens, copy_backlog_s, cpu_scale)


class CopyLaneClock:
    """An estimate of when the copy lane will be idle (host time), from the copies queued on it and
    the cost model's time per expert; and of the time a layer's forward takes. Prefetch uses only
    the copy time a layer leaves spare, so it doesn't delay the fetches the next layer must make."""

    def __init__(self, fetch_s: float) -> None:
        self.fetch_s = fetch_s
        self.idle_at = 0.0
        self.layer_s = 0.0  # moving average of the time from one layer's forward to the next's
        self._last: tuple[int, float] | None = None

    def queued(self, experts: int) -> None:
        now = time.perf_counter()
        self.idle_at = max(now, self.idle_at) + experts * self.fetch_s

    def backlog_s(self) -> float:
        return max(0.0, self.idle_at - time.perf_counter())

    def layer_started(self, index: int) -> None:
        now = time.perf_counter()
        if self._last is not None and self._last[0] == index - 1:
            interval = now - self._last[1]
            self.layer_s = interval if self.layer_s == 0.0 else 0.8 * self.layer_s + 0.2 * interval
        self._last = (index, now)

    def spare_copies(self) -> int:
        """Experts the copy lane can take on and still be idle by the end of the next layer."""
        if self.fetch_s <= 0:
            return sys.maxsize
        if not math.isfinite(self.fetch_s):
            return 0
        return max(0, int((self.layer_s - self.backlog_s()) / self.fetch_s))


def _median_time(run: Callable[[], None], lanes: DeviceLanes, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        lanes.synchronize()
        start = time.perf_counter()
        run()
        lanes.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _line(one: float, many: float, tokens: int) -> tuple[float, float]:
    """(base, per token) seconds through the times on 1 and on `tokens` tokens."""
    per_token = max(0.0, (many - one) / (tokens - 1))
    return max(0.0, one - per_token), per_token


@torch.no_grad()
def calibrate_miss_costs(cache: ExpertCache, lanes: DeviceLanes, repeats: int = 5, tokens: int = 16,
                         activation_dtype: torch.dtype | None = None, int4: Int4Experts | None = None) -> MissCostModel:
    """Time the copy of one expert into (still empty) slot 0, and its CPU compute on 1 and on `tokens`
    tokens of `activation_dtype` (default: the weights' dtype; block-scaled weights need it) in the
    compute dtype (`cpu_experts.compute_dtype`) and (half precision) in float32; a layer without slots
    can't fetch (fetch_s = inf). Each CPU run takes the layer's next expert (round robin): a missed
    expert's weights come from memory, not from the CPU's caches (one matrix timed over and over would
    stream from cache, faster than a miss ever does). The call is short where the CPU's half-precision
    GEMMs are fast, and longer where they are slow. With `int4` (the layer's int4 host copies) the CPU
    runs read those, as its misses then do."""
    host = cache.host
    # Passed only when set: the plain call stays run_cpu_experts' four arguments.
    run_cpu = functools.partial(run_cpu_experts, int4=int4) if int4 is not None else run_cpu_experts
    fetch_s = math.inf
    if cache.num_slots > 0:
        pairs = [(slot[0], weight[0]) for slot, weight in zip(expert_tensors(cache.slots), expert_tensors(host))]
        fetch_s = _median_time(lambda: lanes.copy_after(pairs), lanes, repeats)
    hidden = host.hidden_size
    if activation_dtype is None and host.scales is not None:
        raise ValueError("calibrating block-scaled experts needs the activations' dtype")
    native = compute_dtype(host, activation_dtype or host.gate_up.dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0)).to(native)
    ones = torch.ones(tokens)
    first_row = torch.zeros(1, dtype=torch.int64)
    experts = itertools.cycle(range(cache.num_experts))

    def line(upcast_from_tokens: float) -> tuple[float, float]:
        one = _median_time(lambda: run_cpu(x[:1], host, [(next(experts), first_row, ones[:1])], upcast_from_tokens),
                           lanes, repeats)
        many = _median_time(lambda: run_cpu(x, host, [(next(experts), torch.arange(tokens), ones)], upcast_from_tokens),
                            lanes, repeats)
        return _line(one, many, tokens)

    cpu_base_s, cpu_per_token_s = line(math.inf)
    upcast = line(1) if native != torch.float32 else (math.inf, 0.0)
    return MissCostModel(fetch_s, cpu_base_s, cpu_per_token_s, *upcast)
