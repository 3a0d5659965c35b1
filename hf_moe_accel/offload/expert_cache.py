"""One MoE layer's expert cache: slots on the GPU side holding copies of some experts' weights.

The slot tensors have the layout of the layer's expert tensors with S rows instead of E, so the
fused kernels run over them unchanged, given expert ids remapped to slot ids (-1: not here). The
host-side tables say which expert sits in which slot; the layer's eviction policy picks victims.
With `by_address` (zero-copy decode) the cache also keeps, on the device, each expert's address:
its slot's while it is cached, its pinned host copy's otherwise (`ExpertAddresses`), and a table
that counts lookups and hits on the device (`lookup_values`), so a CUDA graph replaying a zero-copy
forward keeps the counters going without the host.

An expert is all of its [E, ...] tensors (`expert_tensors`): weights, biases and, for block-scaled
(FP8) experts, their float32 scales. Each is kept, copied, counted and addressed the same way, so an
FP8 expert's slot, fetch and host copy hold its FP8 bytes and its scales, and a kernel reading an
expert from a slot or from host memory finds its scales in the same place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..kernels.spec import BlockScales, ExpertAddresses, ExpertWeights, row_addresses
from .eviction import EvictionPolicy
from .transfers import DeviceLanes

# Packed zero-copy counters: lookups count in units of LOOKUP, hits in units of 1 (below 2**32 a layer).
LOOKUP = 1 << 32


def unpack_lookups(packed: int) -> tuple[int, int]:
    """(lookups, hits) of a sum of `lookup_values`."""
    return packed >> 32, packed & (LOOKUP - 1)


def expert_tensors(weights: ExpertWeights) -> list[torch.Tensor]:
    """The [E, ...] tensors of a layer's experts (block scales included), in a fixed order."""
    scales = (weights.scales.gate_up, weights.scales.down) if weights.scales is not None else ()
    return [t for t in (weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias, *scales) if t is not None]


def addressed_tensors(weights: ExpertWeights) -> list[torch.Tensor]:
    """The tensors the kernels read by address, in `ExpertAddresses`' field order: gate_up, down and,
    for block-scaled experts, their scales (biases are never read by address)."""
    scales = (weights.scales.gate_up, weights.scales.down) if weights.scales is not None else ()
    return [weights.gate_up, weights.down, *scales]


def with_expert_tensors(weights: ExpertWeights, make: Callable[[torch.Tensor], torch.Tensor]) -> ExpertWeights:
    """`weights` with each of its [E, ...] tensors replaced by `make(tensor)` (same layout flags)."""
    def each(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else make(t)

    scales = weights.scales
    return replace(weights, gate_up=make(weights.gate_up), down=make(weights.down),
                   gate_up_bias=each(weights.gate_up_bias), down_bias=each(weights.down_bias),
                   scales=None if scales is None else BlockScales(make(scales.gate_up), make(scales.down), scales.block_size))


def bytes_per_expert(weights: ExpertWeights) -> int:
    return sum(t[0].numel() * t.element_size() for t in expert_tensors(weights))


class ExpertCache:
    def __init__(self, host: ExpertWeights, num_slots: int, device: torch.device, policy: EvictionPolicy,
                 by_address: bool = False) -> None:
        self.host = host
        self.num_experts = host.num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.expert_bytes = bytes_per_expert(host)

        self.slots = with_expert_tensors(
            host, lambda t: torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, device=device))
        self.slot_of_expert = torch.full((self.num_experts,), -1, dtype=torch.int64)  # host table
        self.expert_in_slot = [-1] * num_slots
        self.prefetched_unused: set[int] = set()  # prefetched experts not routed to since
        self.ready = None  # event: the last copy into a slot
        self.last_read = None  # event: the last kernel reading the slots
        # Set once a CUDA graph captured a read of the slots: its replays record no event, so a copy
        # into a slot then waits for everything queued on the compute stream instead of `last_read`.
        self.read_by_graph = False
        # Zero-copy: each expert's address on the device, rebuilt from slot_of_expert when installs change it.
        self._device_addresses = self._empty_address_tables(device) if by_address else None
        self._lookup_values = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device) if by_address else None
        self.addresses_stale = by_address

    def _empty_address_tables(self, device: torch.device) -> ExpertAddresses:
        # One table per tensor read by address: a kernel reads an expert's rows at one address per
        # tensor, in the layout of the slot tensor, so host and slot copies must agree on it.
        for host_t, slot_t in zip(addressed_tensors(self.host), addressed_tensors(self.slots)):
            if host_t.stride()[1:] != slot_t.stride()[1:]:
                raise ValueError(f"an expert's layout differs between host {host_t.stride()} and slots {slot_t.stride()}")
            if slot_t.is_cuda and not host_t.is_pinned():
                raise ValueError("zero-copy reads need the host experts in pinned memory")
        count = len(addressed_tensors(self.host))
        return ExpertAddresses(*(torch.empty(self.num_experts, dtype=torch.int64, device=device) for _ in range(count)))

    def _address_tables(self) -> list[torch.Tensor]:
        """The device tables of `_device_addresses`, in `addressed_tensors` order."""
        tables = self._device_addresses
        return [t for t in (tables.gate_up, tables.down, tables.gate_up_scale, tables.down_scale) if t is not None]

    @property
    def by_address(self) -> bool:
        return self._device_addresses is not None

    def device_addresses(self) -> ExpertAddresses:
        """Each expert's address on the device (its slot's while cached, else its host copy's), brought up
        to date on the current stream; call after waiting for the slot copies (`ready`): an installed
        expert's slot address is live from here."""
        if self._device_addresses is None:
            raise RuntimeError("this cache was made without by_address")
        if self.addresses_stale:
            cached = self.slot_of_expert >= 0
            experts = torch.arange(self.num_experts)
            for device_table, host_t, slot_t in zip(self._address_tables(), addressed_tensors(self.host),
                                                    addressed_tensors(self.slots), strict=True):
                addresses = row_addresses(host_t, experts)
                addresses[cached] = row_addresses(slot_t, self.slot_of_expert[cached])
                device_table.copy_(addresses)  # pageable source: staged before copy_ returns
            self._lookup_values[: self.num_experts].copy_(LOOKUP + cached.to(torch.int64))
            self.addresses_stale = False
        return self._device_addresses

    def lookup_values(self) -> torch.Tensor:
        """[E + 1] int64 on the device, current with `device_addresses()`: LOOKUP + 1 for a cached expert,
        LOOKUP for the others, 0 at index E (where routing's -1 lands after `remainder(E + 1)`). The sum
        over a forward's routed pairs packs its lookups (high bits) and hits (low bits)."""
        if self._lookup_values is None:
            raise RuntimeError("this cache was made without by_address")
        return self._lookup_values

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
        self.ready = lanes.copy_after(pairs, wait_for=lanes.compute_mark() if self.read_by_graph else self.last_read)
        self.addresses_stale = self.by_address
        return len(assignments) * self.expert_bytes
