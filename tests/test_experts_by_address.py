"""`fused_experts_at`: the kernels of both paths reading each expert's weights at an address from a
table (some experts in cache slots, the others in host memory), against the reference over all experts.

On CPU both "slots" and "host" are CPU tensors and the kernels run in Triton's interpreter
(conftest); on a GPU the host half is pinned memory read over PCIe (zero-copy), `-m gpu`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hf_moe_accel.kernels import ExpertAddresses, address_path, fused_experts_at
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.kernels.spec import row_addresses

from .test_kernel_experts import TOLERANCE, Case, make_routing, make_weights, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def split_by_address(case: Case, cached: list[int], host_device: str = "cpu", pin: bool = False):
    """The case's weights, `cached` experts copied into slot tensors on DEVICE and every expert in a
    host copy; (all weights for the reference, the slots as the layout, the address tables)."""
    weights = make_weights(case)
    host = [t.to(host_device) for t in (weights.gate_up, weights.down)]
    if pin:
        host = [t.pin_memory() for t in host]
    slots = [torch.empty((max(len(cached), 1), *t.shape[1:]), dtype=t.dtype, device=DEVICE) for t in host]
    tables = []
    for host_t, slot_t in zip(host, slots):
        addresses = row_addresses(host_t, torch.arange(case.experts))
        for slot, expert in enumerate(cached):
            slot_t[slot].copy_(host_t[expert])
        addresses[cached] = row_addresses(slot_t, torch.arange(len(cached)))
        tables.append(addresses.to(DEVICE))
    layout = replace(weights, gate_up=slots[0], down=slots[1])
    return weights, layout, ExpertAddresses(*tables), host


@pytest.mark.parametrize("case", [
    Case(tokens=1, top_k=2),
    Case(tokens=5, top_k=3, hidden=40, inter=24),  # sizes off the blocks
    Case(tokens=3, top_k=2, transposed=True),
    Case(tokens=2, top_k=2, has_gate=False, act="gelu"),
    Case(tokens=4, top_k=2, interleaved=True, act="swiglu_oai"),
    Case(tokens=2, top_k=2, dtype=torch.float16),
])
@pytest.mark.parametrize("cached", [[], [1, 4], list(range(8))])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_experts_by_address_match_the_reference(case, cached, path):
    weights, layout, addresses, _ = split_by_address(case, cached)
    x, ids, topk_weights = make_routing(case)
    ids[0, -1] = -1  # "no expert": adds nothing, reads nothing (no kernel may follow a table row -1)
    out = fused_experts_at(x, layout, addresses, ids, topk_weights, path=path)
    ref = experts_reference(x, weights, ids, topk_weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < TOLERANCE[case.dtype]


def test_one_token_takes_the_decode_path_and_more_the_grouped_one():
    """Several tokens may share an expert: the grouped path reads it once, not once per pair."""
    assert address_path(1) == "decode"
    assert [address_path(t) for t in (2, 8, 32, 4096)] == ["prefill"] * 4
    case = Case(tokens=2, top_k=2)
    _, layout, addresses, _ = split_by_address(case, [1])
    x, ids, topk_weights = make_routing(case)
    with pytest.raises(ValueError, match="path must be 'decode' or 'prefill'"):
        fused_experts_at(x, layout, addresses, ids, topk_weights, path="fast")


def test_shared_experts_over_more_tokens_than_a_block():
    """Many tokens on few experts: each expert's pairs span several BLOCK_M blocks on the grouped path."""
    case = Case(tokens=70, top_k=2, hidden=40, inter=24)
    weights, layout, addresses, _ = split_by_address(case, [0, 3])
    x, _, topk_weights = make_routing(case)
    ids = torch.stack([torch.arange(70) % 2 * 3, torch.full((70,), 5)], dim=1).to(DEVICE)  # experts 0, 3 and 5
    out = fused_experts_at(x, layout, addresses, ids, topk_weights)
    assert rel_error(out, experts_reference(x, weights, ids, topk_weights)) < TOLERANCE[case.dtype]


def test_a_table_change_moves_an_expert_without_touching_the_weights():
    """Pointing an expert's entry at another copy is all it takes (what a cache install does)."""
    case = Case(tokens=1, top_k=1)
    weights, layout, addresses, host = split_by_address(case, [2])
    x, _, topk_weights = make_routing(case)
    ids = torch.tensor([[2]], device=DEVICE)
    before = fused_experts_at(x, layout, addresses, ids, topk_weights)
    layout.gate_up[0].zero_()  # the slot's copy is now wrong; the host copy still right
    addresses.gate_up[2:3] = row_addresses(host[0], torch.tensor([2])).to(DEVICE)
    torch.testing.assert_close(fused_experts_at(x, layout, addresses, ids, topk_weights), before)
    torch.testing.assert_close(before, experts_reference(x, weights, ids, topk_weights), rtol=1e-4, atol=1e-4)


def test_biases_and_plain_cpu_tensors_are_refused(monkeypatch):
    case = Case(tokens=1, top_k=1, bias=True, act="swiglu_oai", interleaved=True)
    weights, layout, addresses, _ = split_by_address(replace(case, bias=False), [])
    x, ids, topk_weights = make_routing(case)
    with pytest.raises(ValueError, match="biases"):
        fused_experts_at(x, make_weights(case), addresses, ids, topk_weights)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="Triton kernels"):
            fused_experts_at(x, layout, addresses, ids, topk_weights)


@pytest.mark.gpu
@pytest.mark.parametrize("cached", [[], [0, 5, 7]])
@pytest.mark.parametrize("tokens, path", [(2, "decode"), (2, "prefill"), (37, "prefill")])
def test_zero_copy_reads_pinned_host_memory_on_gpu(cached, tokens, path):
    """bf16 experts in pinned host memory, read by the CUDA kernels through their host addresses."""
    case = Case(tokens=tokens, top_k=2, hidden=256, inter=192, dtype=torch.bfloat16)
    weights, layout, addresses, host = split_by_address(case, cached, pin=True)
    assert all(t.is_pinned() for t in host)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_at(x, layout, addresses, ids, topk_weights, path=path)
    assert rel_error(out, experts_reference(x, weights, ids, topk_weights)) < TOLERANCE[case.dtype]
