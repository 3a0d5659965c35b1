"""Counters of the expert cache and CPU offload, per MoE layer and phase (prefill, decode)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PHASES = ("prefill", "decode")


@dataclass
class LayerOffloadStats:
    """One MoE layer's counters. A lookup is one expert routed to in one forward (however many
    tokens chose it): a hit when it sat in a slot, else a miss, fetched or computed on the CPU. In
    zero-copy forwards a lookup is one routed (token, expert) pair, and h2d_bytes counts the experts
    read from host memory (once per missed pair for one token, once per missed expert for several)."""

    forwards: int = 0
    tokens: int = 0
    # Of `forwards`: run zero-copy (no host round trip). `forwards`, `tokens` and this count forwards the host
    # ran; CUDA-graph replays of zero-copy decode steps add only to lookups, hits and h2d_bytes (device counters).
    zero_copy_forwards: int = 0
    lookups: int = 0
    hits: int = 0
    fetched: int = 0
    cpu_experts: int = 0
    prefetched: int = 0
    refilled: int = 0  # experts copied into slots between zero-copy decode steps (OffloadOptions.zero_copy_refill_every)
    prefetch_hits: int = 0  # hits on an expert prefetched for this layer and not used before
    # The experts prefetch picked for this layer (copied or not), and how many of them it was then routed to.
    predicted: int = 0
    predicted_routed: int = 0
    prefetch_paused: int = 0  # forwards whose prefetch for this layer was skipped for poor predictions
    h2d_bytes: int = 0  # host to GPU: expert copies, CPU results, index tables
    d2h_bytes: int = 0  # GPU to host: routing, token rows for the CPU
    cpu_expert_s: float = 0.0  # wall time of the CPU expert work
    cpu_calibrated_s: float = 0.0  # what the calibrated miss costs predicted for that work
    # (token, expert) pairs dropped as misses under OffloadOptions.miss_drop_threshold (not in lookups)
    miss_dropped: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_routed / self.predicted if self.predicted else 0.0

    @property
    def pcie_bytes(self) -> int:
        return self.h2d_bytes + self.d2h_bytes

    def __add__(self, other: LayerOffloadStats) -> LayerOffloadStats:
        return LayerOffloadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy, "pcie_bytes": self.pcie_bytes}


@dataclass
class OffloadStats:
    """Counters of every offloaded MoE layer (by module name) for one phase, or both ("all")."""

    phase: str
    layers: dict[str, LayerOffloadStats]

    @property
    def total(self) -> LayerOffloadStats:
        return sum(self.layers.values(), LayerOffloadStats())

    def as_dict(self) -> dict:
        layers = {name: stats.as_dict() for name, stats in self.layers.items()}
        return {"phase": self.phase, "total": self.total.as_dict(), "layers": layers}

    def summary(self) -> str:
        t = self.total
        return (
            f"{self.phase}: hit rate {100 * t.hit_rate:.1f}% ({t.hits}/{t.lookups} expert lookups), fetched {t.fetched}, "
            f"on CPU {t.cpu_experts} ({t.cpu_expert_s:.3f} s, calibrated {t.cpu_calibrated_s:.3f} s), prefetched {t.prefetched} ({t.prefetch_hits} used; "
            f"predictions {100 * t.prefetch_accuracy:.0f}% right, paused {t.prefetch_paused}x), "
            f"PCIe {t.pcie_bytes / 2**20:.1f} MiB"
            + (f", {t.miss_dropped} missed (token, expert) pairs dropped" if t.miss_dropped else "")
            + (f"; {t.zero_copy_forwards} of {t.forwards} eager layer forwards zero-copy (their lookups, and graph "
               "replays', are routed pairs)" if t.zero_copy_forwards else "")
        )
