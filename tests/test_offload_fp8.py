"""Expert offload at FP8 bytes (issue 31, part 3): FP8 experts, Transformers' FP8Experts or quantized by
`expert_dtype="fp8"`, offloaded to a GPU budget keep their FP8 weights and float32 block scales in host
memory and in the slots, and every miss path (zero-copy read, fetch into a slot, CPU compute) reads them.

The reference is the resident FP8 model (the same stored weights, every expert on the device): an
offloaded model must compute what it computes, whichever way each expert is served. On CPU the CPU
stands in for the GPU side (`OffloadOptions(device="cpu")`) and zero-copy reads run the Triton kernels
in Triton's interpreter, in float32 and float16; `-m gpu` runs the same structure in bf16 on a GPU,
with pinned host memory, zero-copy over PCIe and CUDA graphs.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe_accel import (
    OffloadOptions,
    accelerate,
    is_accelerated,
    offload_stats,
    unpatch,
)
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.kernels import BlockScales, ExpertAddresses, fused_experts_at
from hf_moe_accel.kernels.experts_fp8_reference import FP8_DTYPE, experts_fp8_reference
from hf_moe_accel.kernels.spec import is_experts_module, row_addresses
from hf_moe_accel.offload import engine as offload
from hf_moe_accel.offload.engine import (
    decode_hooks,
    offload_budget,
    offload_engine,
    prepare_offload,
)
from hf_moe_accel.state import state_of

from .helpers import load_fixture, state_snapshot
from .test_fixtures import _greedy
from .test_fp8_experts import fp8_model, same_bits, tiny_config, token_ids
from .test_graphs import stand_in_capture
from .test_kernel_experts import TOLERANCE, make_routing, rel_error
from .test_kernel_fp8 import Fp8Case, make_fp8_weights
from .test_offload import MIXED_COSTS, random_sequences

CUDA = torch.cuda.is_available()
MISS_POLICIES = ("auto", "fetch", "cpu")
PROJECTIONS = ("gate_up_proj", "down_proj")
NEW_TOKENS = 12


def options(**overrides) -> OffloadOptions:
    """The CPU stand-in, with a fixed reserve and miss costs (no calibration) unless overridden."""
    return OffloadOptions(**{"device": "cpu", "reserve": "16MiB", "cost_model": MIXED_COSTS, **overrides})


def experts_of(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def fp8_expert_bytes(experts: torch.nn.Module) -> int:
    """One expert's bytes as offload must hold it: its FP8 gate_up and down and their float32 scales."""
    tensors = [getattr(experts, p) for p in PROJECTIONS] + [getattr(experts, f"{p}_scale_inv") for p in PROJECTIONS]
    return sum(t.nbytes for t in tensors) // experts.down_proj.shape[0]


def budget_for(model, fraction: float, expert_dtype: str | None = None, **overrides) -> int:
    """A budget with room for `fraction` of the experts as they will be stored (FP8 with expert_dtype)."""
    plan = prepare_offload(model, 10**12, options(**overrides), expert_dtype=expert_dtype).budget
    return plan.minimum + int(fraction * sum(b * n for b, n in zip(plan.expert_bytes, plan.num_experts)))


def greedy_kwargs(prompt: torch.Tensor, new_tokens: int = 6) -> dict:
    return {"attention_mask": torch.ones_like(prompt), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
            "do_sample": False, "pad_token_id": 0}


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


# ---------------------------------------------------------------------------------------------
# The kernels read an expert's scales where its weights are


def split_fp8_by_address(case: Fp8Case, cached: list[int], device: str = "cpu", pin: bool = False):
    """The case's FP8 experts in host tensors (pinned with `pin`), `cached` ones also copied into slot
    tensors on `device` (weights and scales); (all weights, the slots as the layout, the address tables)."""
    weights = make_fp8_weights(case, device="cpu")
    host = [weights.gate_up, weights.down, weights.scales.gate_up, weights.scales.down]
    host = [t.pin_memory() for t in host] if pin else host
    slots = [torch.zeros((max(len(cached), 1), *t.shape[1:]), dtype=t.dtype, device=device) for t in host]
    tables = []
    for host_t, slot_t in zip(host, slots):
        addresses = row_addresses(host_t, torch.arange(case.experts))
        for slot, expert in enumerate(cached):
            slot_t[slot].copy_(host_t[expert])
        addresses[cached] = row_addresses(slot_t, torch.arange(len(cached)))
        tables.append(addresses.to(device))
    layout = replace(weights, gate_up=slots[0], down=slots[1], scales=BlockScales(slots[2], slots[3], case.block))
    reference = replace(weights, gate_up=host[0].to(device), down=host[1].to(device),
                        scales=BlockScales(host[2].to(device), host[3].to(device), case.block))
    return reference, layout, ExpertAddresses(*tables)


@pytest.mark.parametrize("cached, path, tokens", [
    ([], "decode", 1), (list(range(8)), "decode", 1), ([1, 4], "decode", 3), ([1, 4], "prefill", 5), ([], "prefill", 4),
], ids=["host-decode", "slots-decode", "mixed-decode", "mixed-prefill", "host-prefill"])
def test_experts_by_address_read_fp8_scales_where_the_weights_are(cached, path, tokens):
    """Sizes off the 128 block (partial blocks, gate and up rows in one block) and block scales 64x apart:
    a kernel that took a scale from the layout's row of the expert id, rather than from the expert's
    own address, would miss the reference."""
    case = Fp8Case(tokens=tokens, top_k=2)
    weights, layout, addresses = split_fp8_by_address(case, cached)
    x, ids, topk_weights = make_routing(case, device="cpu")
    ids[0, -1] = -1  # "no expert": reads neither weights nor scales
    out = fused_experts_at(x, layout, addresses, ids, topk_weights, path=path)
    ref = experts_fp8_reference(x, weights, ids, topk_weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < TOLERANCE[case.dtype]


def test_a_scale_table_entry_moves_an_experts_scales():
    """Pointing an expert's down-scale entry at scales twice as large doubles that expert's output:
    the kernels read the scales at the table's address, nothing else."""
    case = Fp8Case(tokens=1, top_k=1)
    weights, layout, addresses = split_fp8_by_address(case, [2])
    x, _, topk_weights = make_routing(case, device="cpu")
    ids = torch.tensor([[5]])
    before = fused_experts_at(x, layout, addresses, ids, topk_weights)
    doubled = 2 * weights.scales.down
    addresses.down_scale[5:6] = row_addresses(doubled, torch.tensor([5]))
    torch.testing.assert_close(fused_experts_at(x, layout, addresses, ids, topk_weights), 2 * before, rtol=1e-5, atol=1e-6)
    without = ExpertAddresses(addresses.gate_up, addresses.down)
    with pytest.raises(ValueError, match="scales' addresses"):
        fused_experts_at(x, layout, without, ids, topk_weights)


# ---------------------------------------------------------------------------------------------
# Offloaded FP8 models against resident ones


@functools.cache
def resident_outputs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and logits of the fixture with its experts quantized at patch time, all resident."""
    model, tokenizer = load_fixture(path)
    accelerate(model, expert_dtype="fp8")
    return _greedy(model, tokenizer, NEW_TOKENS), logits_of(model, random_sequences(model, 2, 24))


@pytest.mark.parametrize("miss_policy", MISS_POLICIES)
def test_fixture_offloaded_at_fp8_equals_resident_fp8(fixture_path, miss_policy):
    """The trained fixtures, quantized by expert_dtype="fp8" then offloaded to a budget with room for a
    quarter of their FP8 experts: logits and greedy tokens are the resident FP8 model's."""
    tokens, logits = resident_outputs(fixture_path)
    model, tokenizer = load_fixture(fixture_path)
    budget = budget_for(model, 0.25, expert_dtype="fp8")
    accelerate(model, gpu_memory=budget, expert_dtype="fp8", offload=options(miss_policy=miss_policy))
    plan = offload_budget(model)
    assert 0 < sum(plan.slots) < sum(plan.num_experts) / 3
    assert torch.equal(_greedy(model, tokenizer, NEW_TOKENS), tokens)
    torch.testing.assert_close(logits_of(model, random_sequences(model, 2, 24)), logits, rtol=1e-4, atol=1e-4)
    total = offload_stats(model).total
    assert total.lookups == total.hits + total.fetched + total.cpu_experts > total.hits > 0
    if miss_policy != "auto":
        assert (total.fetched > 0, total.cpu_experts > 0) == (miss_policy == "fetch", miss_policy == "cpu")


ZERO_COPY = {"zero_copy": True, "zero_copy_max_tokens": 2}
# Partial 128 blocks (hidden 200, inter 72); zero-copy runs Triton's interpreter, so a smaller model
# there, still in partial blocks (hidden 96 and gate_up's 96 rows in 64 x 64 blocks).
CHECKPOINT_CASES = [
    pytest.param(torch.float32, "auto", {}, id="float32-auto"),
    pytest.param(torch.float32, "fetch", {}, id="float32-fetch"),
    pytest.param(torch.float32, "cpu", {}, id="float32-cpu"),
    pytest.param(torch.float16, "auto", {"cost_model": None}, id="float16-auto-calibrated"),
    pytest.param(torch.float16, "cpu", {}, id="float16-cpu"),
    pytest.param(torch.float32, "auto", ZERO_COPY, id="float32-zero-copy"),
    pytest.param(torch.float16, "fetch", ZERO_COPY, id="float16-zero-copy"),
]


def small_fp8_model(dtype: torch.dtype) -> torch.nn.Module:
    return fp8_model(tiny_config(96, 48), dtype, block=(64, 64))


@pytest.mark.parametrize("dtype, miss_policy, overrides", CHECKPOINT_CASES)
def test_fp8_checkpoint_offloaded_equals_resident(dtype, miss_policy, overrides):
    """Transformers' FP8Experts (gate_up's scale grid as Transformers allocates it), two experts of eight
    cached a layer: prefill forwards of several tokens, then one-token steps (zero-copy where asked).
    Logits and greedy tokens equal the resident FP8 model's; unpatch gives the stock FP8 model back,
    bitwise."""
    zero_copy = bool(overrides.get("zero_copy"))
    model = small_fp8_model(dtype) if zero_copy else fp8_model(tiny_config(200, 72), dtype)
    resident = copy.deepcopy(model)
    accelerate(resident)
    before = state_snapshot(model)
    budget = budget_for(model, 0.25)
    accelerate(model, gpu_memory=budget, offload=options(miss_policy=miss_policy, **overrides))
    assert offload_budget(model).slots == (2, 2)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for ids in (token_ids(2, 7), token_ids(1, 1, seed=2), token_ids(2, 1, seed=3)):
        torch.testing.assert_close(logits_of(model, ids), logits_of(resident, ids), **tolerance)
    prompt = token_ids(1, 5)
    new_tokens = 3 if zero_copy else 6
    assert torch.equal(model.generate(prompt, **greedy_kwargs(prompt, new_tokens)),
                       resident.generate(prompt, **greedy_kwargs(prompt, new_tokens)))
    prefill, decode = offload_stats(model, "prefill").total, offload_stats(model, "decode").total
    assert prefill.lookups == prefill.hits + prefill.fetched + prefill.cpu_experts > prefill.hits > 0
    if zero_copy:  # a lookup is a routed pair, read where it is
        assert decode.zero_copy_forwards == decode.forwards > 0 and decode.fetched == decode.cpu_experts == 0
    else:
        assert decode.zero_copy_forwards == 0 and decode.lookups == decode.hits + decode.fetched + decode.cpu_experts
    unpatch(model)
    assert same_bits(before, state_snapshot(model)) and not is_accelerated(model)


def test_budget_counts_fp8_bytes_and_scales(fixture_path):
    """The budget's bytes per expert are the FP8 bytes plus the float32 scales: predicted before
    expert_dtype quantizes, found after it, in the slots and per fetch; about twice the slots of bf16
    experts fit a budget."""
    bf16, _ = load_fixture(fixture_path, dtype=torch.bfloat16)
    bf16_plan = prepare_offload(bf16, 10**12, options()).budget
    model, _ = load_fixture(fixture_path)
    predicted = prepare_offload(model, 10**12, options(), expert_dtype="fp8").budget
    budget = predicted.minimum + 6 * predicted.expert_bytes[0]
    accelerate(model, gpu_memory=budget, expert_dtype="fp8", offload=options(miss_policy="fetch", prefetch=False))
    plan, engine = offload_budget(model), offload_engine(model)
    found = tuple(fp8_expert_bytes(m) for m in experts_of(model))
    assert plan.expert_bytes == predicted.expert_bytes == found
    for experts, layer in zip(experts_of(model), engine.layers):
        hidden, inter = experts.down_proj.shape[1:]
        scales = 4 * (-(-2 * inter // 128) * -(-hidden // 128) + -(-hidden // 128) * -(-inter // 128))
        assert layer.cache.expert_bytes == 3 * hidden * inter + scales
        assert layer.cache.resident_bytes == layer.cache.num_slots * layer.cache.expert_bytes
    assert sum(plan.slots) == 6 and plan.total <= budget
    assert all(1.99 < b / f < 2 for b, f in zip(bf16_plan.expert_bytes, plan.expert_bytes))
    with torch.no_grad():
        model(random_sequences(model, 1, 8))
    total = offload_stats(model).total
    assert total.fetched > 0 and total.h2d_bytes >= total.fetched * plan.expert_bytes[0]
    assert total.h2d_bytes < (total.fetched + 1) * plan.expert_bytes[0]  # the rest: slot ids, a few bytes


def test_host_copies_and_slots_hold_fp8(fixture_path):
    """Host memory holds the experts once, in FP8 (the module's own parameters, one byte an element) with
    float32 scales; the slots have that layout with fewer rows."""
    model, _ = load_fixture(fixture_path)
    accelerate(model, gpu_memory="1GiB", expert_dtype="fp8", offload=options(slots_per_layer=2))
    for experts, layer in zip(experts_of(model), offload_engine(model).layers):
        host, slots = layer.cache.host, layer.cache.slots
        for proj, stored, slot in ((PROJECTIONS[0], host.gate_up, slots.gate_up), (PROJECTIONS[1], host.down, slots.down)):
            weight = getattr(experts, proj)
            assert weight.dtype == stored.dtype == slot.dtype == FP8_DTYPE and weight.device.type == "cpu"
            assert weight.nbytes == weight.numel() and weight.data_ptr() == stored.data_ptr()
            assert slot.shape == (2, *weight.shape[1:])
        for stored, slot in ((host.scales.gate_up, slots.scales.gate_up), (host.scales.down, slots.scales.down)):
            assert stored.dtype == slot.dtype == torch.float32 and slot.shape == (2, *stored.shape[1:])
        assert host.scales.gate_up.data_ptr() == experts.gate_up_proj_scale_inv.data_ptr()


def test_unpatch_restores_kept_originals_else_refuses(fixture_path):
    """As for resident FP8 experts: with keep_original_experts the original parameters come back, bitwise,
    where they were; without, unpatch refuses and the model stays offloaded and running."""
    model, _ = load_fixture(fixture_path)
    before, params = state_snapshot(model), {id(p) for p in model.parameters()}
    sequences = random_sequences(model, 1, 6)
    accelerate(model, gpu_memory="1GiB", expert_dtype="fp8", keep_original_experts=True, offload=options(slots_per_layer=2))
    logits_of(model, sequences)
    unpatch(model)
    assert same_bits(before, state_snapshot(model)) and {id(p) for p in model.parameters()} == params
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in experts_of(model)) and state_of(model) is None

    accelerate(model, gpu_memory="1GiB", expert_dtype="fp8", offload=options(slots_per_layer=2))
    offloaded = logits_of(model, sequences)
    with pytest.raises(RuntimeError, match="keep_original_experts=True"):
        unpatch(model)
    assert is_accelerated(model) and offload_engine(model) is not None
    torch.testing.assert_close(logits_of(model, sequences), offloaded)


def test_zero_copy_fp8_decode_replays_graphs_and_equals_resident():
    """Zero-copy decode of FP8 experts through graph replays (the CPU stand-in): tokens equal the resident
    FP8 model's eager ones, and each expert read from host memory counts its FP8 bytes and scales."""
    model = small_fp8_model(torch.float32)
    resident = copy.deepcopy(model)
    accelerate(resident, cuda_graphs=False)
    accelerate(model, gpu_memory="1GiB", cuda_graphs=False,
               offload=options(slots_per_layer=2, zero_copy=True, zero_copy_max_tokens=1, kv_cache_tokens=300))
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture), hooks=decode_hooks(model))
    prompt = token_ids(1, 5)
    assert torch.equal(model.generate(prompt, **greedy_kwargs(prompt, 4)), resident.generate(prompt, **greedy_kwargs(prompt, 4)))
    assert graph_stats(model)["replays"] == 3
    decode = offload_stats(model, "decode").total
    expert_bytes = offload_engine(model).layers[0].cache.expert_bytes
    assert expert_bytes == fp8_expert_bytes(experts_of(model)[0])
    assert decode.lookups > decode.hits and decode.h2d_bytes == (decode.lookups - decode.hits) * expert_bytes


def test_zero_copy_of_fp8_needs_a_gpu_that_reads_float8(monkeypatch):
    """Triton loads float8 on compute capability 8.9 and later: below, zero-copy is off by default and
    refused when asked for (the cache still serves FP8 experts); bf16 experts are unaffected."""
    model = fp8_model(tiny_config(), torch.float32)
    weights = [offload._offloaded_weights(m, None) for m in experts_of(model)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "8.9" in offload._zero_copy_problem(torch.device("cuda", 0), weights)
    assert offload._zero_copy_problem(torch.device("cpu"), weights) is None
    plain = [replace(w, scales=None) for w in weights]
    assert offload._zero_copy_problem(torch.device("cuda", 0), plain) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert offload._zero_copy_problem(torch.device("cuda", 0), weights) is None


def test_expert_dtype_with_offload_on_meta_experts_is_refused_before_anything_changes():
    """Experts held by a disk-offloading device map are on the meta device until offload materialises
    them; expert_dtype quantizes before offloading, so it refuses them, changing nothing."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    experts = experts_of(model)[0]
    experts.down_proj = torch.nn.Parameter(torch.empty_like(experts.down_proj, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="meta device"):
        accelerate(model, gpu_memory="1GiB", expert_dtype="fp8", offload=options())
    assert not is_accelerated(model) and experts.down_proj.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# GPU: bf16 activations, FP8 experts in pinned host memory, zero-copy over PCIe, CUDA graphs


def _gpu_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_experts_by_address_read_pinned_fp8_on_gpu():
    """FP8 weights and scales in pinned host memory, some in GPU slots, read by the CUDA kernels."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the kernels read float8 on compute capability 8.9 and later")
    for path, tokens in (("decode", 2), ("prefill", 2), ("prefill", 37)):
        case = Fp8Case(tokens=tokens, top_k=2, hidden=256, inter=192, dtype=torch.bfloat16)
        weights, layout, addresses = split_fp8_by_address(case, [0, 5, 7], device="cuda", pin=True)
        x, ids, topk_weights = make_routing(case, device="cuda")
        out = fused_experts_at(x, layout, addresses, ids, topk_weights, path=path)
        assert rel_error(out, experts_fp8_reference(x, weights, ids, topk_weights)) < TOLERANCE[torch.bfloat16], path


@pytest.mark.gpu
@pytest.mark.parametrize("zero_copy, miss_policy", [(None, "auto"), (False, "auto"), (False, "fetch"), (False, "cpu")])
def test_fixture_offloaded_at_fp8_on_gpu(fixture_path, zero_copy, miss_policy):
    """The trained fixture in bf16, expert_dtype="fp8", in a budget with room for 40% of its FP8 experts:
    experts in pinned host memory as FP8, the budget's bytes per expert FP8 plus scales, peak memory
    within it; logits as close to the resident FP8 model's as bf16 allows (the paths differ in where
    partial sums meet and, on the CPU, in GEMM rounding), greedy tokens mostly equal (graph decode with
    zero-copy, eager through the cache otherwise)."""
    resident, tokenizer = load_fixture(fixture_path, dtype=torch.bfloat16, device="cuda")
    accelerate(resident, expert_dtype="fp8")
    sequence = torch.randint(5, resident.config.vocab_size, (2, 48), device="cuda",
                             generator=torch.Generator("cuda").manual_seed(0))
    expected_logits, expected_tokens = logits_of(resident, sequence).float(), _greedy(resident, tokenizer, 24)
    del resident
    torch.cuda.empty_cache()

    model, _ = load_fixture(fixture_path, dtype=torch.bfloat16, device="cpu")
    settings = OffloadOptions(kv_cache_tokens=1024, prefill_tokens=512, zero_copy=zero_copy, miss_policy=miss_policy)
    plan = prepare_offload(model, 10**12, settings, expert_dtype="fp8").budget
    budget = plan.minimum + int(0.4 * sum(b * n for b, n in zip(plan.expert_bytes, plan.num_experts)))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    accelerate(model, gpu_memory=budget, expert_dtype="fp8", offload=settings)
    assert offload_budget(model).expert_bytes == tuple(fp8_expert_bytes(m) for m in experts_of(model))
    for experts in experts_of(model):
        assert experts.down_proj.dtype == FP8_DTYPE and experts.down_proj.is_pinned()
        assert experts.down_proj_scale_inv.is_pinned()
    logits = logits_of(model, sequence)
    agreement = (logits.argmax(-1) == expected_logits.argmax(-1)).float().mean().item()
    tokens = _greedy(model, tokenizer, 24)
    print(f"{fixture_path.name}: logits error {_gpu_rel_error(logits, expected_logits):.4f}, argmax agreement "
          f"{agreement:.3f}, greedy tokens equal {(tokens == expected_tokens).float().mean().item():.3f}; "
          f"{offload_stats(model).summary()}")
    assert _gpu_rel_error(logits, expected_logits) < 0.02 and agreement >= 0.98
    assert (tokens[:, :8] == expected_tokens[:, :8]).float().mean() >= 0.9
    assert torch.cuda.max_memory_allocated() - base <= budget
    decode = offload_stats(model, "decode").total
    if zero_copy is None:  # auto: on, where the GPU reads float8
        reads_fp8 = torch.cuda.get_device_capability() >= (8, 9)
        assert (decode.zero_copy_forwards > 0) == reads_fp8 and (graph_stats(model)["replays"] > 0) == reads_fp8
    else:
        assert decode.zero_copy_forwards == 0 and decode.lookups > decode.hits
    unpatch(model)


@pytest.mark.gpu
@pytest.mark.parametrize("zero_copy", [None, False])
def test_fp8_checkpoint_offloaded_on_gpu(zero_copy):
    """Transformers' FP8Experts (bf16 activations, partial blocks) offloaded with two slots of eight a
    layer, against the resident model on the GPU; unpatch gives the FP8 parameters back bitwise."""
    model = fp8_model(tiny_config(200, 72), torch.bfloat16)
    resident = copy.deepcopy(model).to("cuda")
    accelerate(resident)
    before = state_snapshot(model)
    accelerate(model, gpu_memory=budget_for(model, 0.25, device="cuda"),
               offload=OffloadOptions(reserve="16MiB", zero_copy=zero_copy))
    assert offload_budget(model).slots == (2, 2)
    for ids in (token_ids(2, 7, device="cuda"), token_ids(1, 1, device="cuda"), token_ids(2, 1, device="cuda")):
        assert _gpu_rel_error(logits_of(model, ids), logits_of(resident, ids)) < 0.02
    prompt = token_ids(1, 5, device="cuda")  # random weights: near-ties, so only the shapes are compared
    assert model.generate(prompt, **greedy_kwargs(prompt, 12)).shape == (1, 17)
    unpatch(model)
    assert same_bits(before, state_snapshot(model))
