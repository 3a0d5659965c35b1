"""Which cached expert gives up its slot when another expert needs one: pluggable policies.

Each MoE layer has its own policy instance. The cache tells it, once per forward, which experts the
router chose (`record`), and when an expert enters a slot (`inserted`); `victim` picks one of the
candidates (resident experts that this step doesn't need) to evict.

- "lru": the expert routed to least recently (an inserted expert counts as just used).
- "lfu": the expert routed to the fewest tokens so far (counts survive eviction); ties: least recent.
- "routing": the lowest routing score, an exponential moving average (per forward, `decay`) of the
  router's weight mass on the expert (the sum of its top-k weights over the tokens). Unlike LFU it
  weighs how strongly the router prefers an expert and forgets old traffic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch


class EvictionPolicy(ABC):
    """Scores the experts of one layer; the lowest-scored candidate is evicted first."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.clock = 0  # forwards seen
        self.last_used = [-1] * num_experts

    def record(self, experts: torch.Tensor, tokens: torch.Tensor, weight_mass: torch.Tensor) -> None:
        """One forward's routing: the distinct experts chosen, their token counts and weight sums (CPU tensors)."""
        self.clock += 1
        for expert in experts.tolist():
            self.last_used[expert] = self.clock
        self._record(experts, tokens, weight_mass)

    def inserted(self, expert: int) -> None:
        """`expert` was copied into a slot (fetched or prefetched)."""

    def victim(self, candidates: Sequence[int]) -> int:
        """The candidate expert to evict (lowest key; ties: least recently used, then lowest id)."""
        if not candidates:
            raise ValueError("no candidate expert to evict")
        return min(candidates, key=lambda e: (self._key(e), self.last_used[e], e))

    def _record(self, experts: torch.Tensor, tokens: torch.Tensor, weight_mass: torch.Tensor) -> None:
        pass

    @abstractmethod
    def _key(self, expert: int) -> float: ...


class LRUPolicy(EvictionPolicy):
    def inserted(self, expert: int) -> None:
        self.last_used[expert] = self.clock

    def _key(self, expert: int) -> float:
        return self.last_used[expert]


class LFUPolicy(EvictionPolicy):
    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts)
        self.counts = [0] * num_experts

    def _record(self, experts: torch.Tensor, tokens: torch.Tensor, weight_mass: torch.Tensor) -> None:
        for expert, count in zip(experts.tolist(), tokens.tolist()):
            self.counts[expert] += count

    def _key(self, expert: int) -> float:
        return self.counts[expert]


class RoutingStatsPolicy(EvictionPolicy):
    def __init__(self, num_experts: int, decay: float = 0.95) -> None:
        super().__init__(num_experts)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.scores = torch.zeros(num_experts, dtype=torch.float64)

    def _record(self, experts: torch.Tensor, tokens: torch.Tensor, weight_mass: torch.Tensor) -> None:
        self.scores.mul_(self.decay)
        self.scores.index_add_(0, experts, weight_mass.to(torch.float64))

    def _key(self, expert: int) -> float:
        return float(self.scores[expert])


PolicyFactory = Callable[[int], EvictionPolicy]
POLICIES: dict[str, PolicyFactory] = {"lru": LRUPolicy, "lfu": LFUPolicy, "routing": RoutingStatsPolicy}


def policy_factory(policy: str | PolicyFactory) -> PolicyFactory:
    """A factory `f(num_experts) -> EvictionPolicy` from a policy name or a factory (a subclass works)."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)}, or an EvictionPolicy subclass"
            )
        return POLICIES[policy]
    if callable(policy):
        return policy
    raise TypeError(
        f"eviction is a policy name ({', '.join(POLICIES)}) or a callable num_experts -> EvictionPolicy, got {policy!r}"
    )
