"""One MoE layer's expert cache: slots on the GPU side holding copies of some experts' weights.

The slot tensors have the layout of the layer's expert tensors with S rows instead of E, so the
fused kernels run over them unchanged, given expert ids remapped to slot ids (-1: not here). The
host-side tables say which expert sits in which slot; the layer's eviction policy picks victims.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels.spec import ExpertWeights
from .eviction import EvictionPolicy
from .transfers import DeviceLanes


def expert_tensors(weights: ExpertWeights) -> list[torch.Tensor]:
    """The [E, ...] tensors of a layer's experts, in a fixed order."""
    return [t for t in (weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias) if t is not None]


def bytes_per_expert(weights: ExpertWeights) -> int:
    return sum(t[0].numel() * t.element_size() for t in expert_tensors(weights))


class ExpertCache:
    def __init__(self, host: ExpertWeights, num_slots: int, device: torch.device, policy: EvictionPolicy) -> None:
        self.host = host
        self.num_experts = host.num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.expert_bytes = bytes_per_expert(host)

        def slot_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, device=device)

        self.slots = replace(
            host,
            gate_up=slot_tensor(host.gate_up),
            down=slot_tensor(host.down),
            gate_up_bias=slot_tensor(host.gate_up_bias),
            down_bias=slot_tensor(host.down_bias),
        )
        self.slot_of_expert = torch.full((self.num_experts,), -1, dtype=torch.int64)  # host table
        self.expert_in_slot = [-1] * num_slots
        self.prefetched_unused: set[int] = set()  # prefetched experts not routed to since
        self.ready = None  # event: the last copy into a slot
        self.last_read = None  # event: the last kernel reading the slots

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in expert_tensors(self.slots))

    def choose_slots(self, count: int, keep: set[int] = frozenset(), protect: set[int] = frozenset()) -> list[int]:
        """Up to `count` slots to fill: empty ones first, then the policy's victims. Slots in `keep`
        and slots holding an expert in `protect` are left alone."""
        chosen = [s for s in range(self.num_slots) if s not in keep and self.expert_in_slot[s] < 0][:count]
        candidates = {
            self.expert_in_slot[s]: s
            for s in range(self.num_slots)
            if s not in keep and self.expert_in_slot[s] >= 0 and self.expert_in_slot[s] not in protect
        }
        while len(chosen) < count and candidates:
            chosen.append(candidates.pop(self.policy.victim(list(candidates))))
        return chosen

    def install(self, lanes: DeviceLanes, assignments: list[tuple[int, int]]) -> int:
        """Copy each (slot, expert) in, after the kernels still reading the slots; returns bytes copied."""
        if not assignments:
            return 0
        pairs = []
        for slot, expert in assignments:
            old = self.expert_in_slot[slot]
            if old >= 0:
                self.slot_of_expert[old] = -1
                self.prefetched_unused.discard(old)
            self.expert_in_slot[slot] = expert
            self.slot_of_expert[expert] = slot
            self.policy.inserted(expert)
            pairs += [(dst[slot], src[expert]) for dst, src in zip(expert_tensors(self.slots), expert_tensors(self.host))]
        self.ready = lanes.copy_after(pairs, wait_for=self.last_read)
        return len(assignments) * self.expert_bytes
