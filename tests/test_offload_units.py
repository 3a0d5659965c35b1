"""The offload engine's parts without a model: budgets, eviction policies, the miss cost model,
the expert cache's slots and the CPU expert compute (CPU only, fast)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hf_moe_accel.costmodel.memory import parse_memory_size, split_budget
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.kernels.spec import Activation, ExpertWeights
from hf_moe_accel.offload.cpu_experts import plan_cpu_job, run_cpu_experts
from hf_moe_accel.offload.eviction import (
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    RoutingStatsPolicy,
    policy_factory,
)
from hf_moe_accel.offload.expert_cache import ExpertCache, bytes_per_expert
from hf_moe_accel.offload.miss_cost import (
    CopyLaneClock,
    CpuTimeCorrection,
    MissCostModel,
    calibrate_miss_costs,
    split_misses,
)
from hf_moe_accel.offload.transfers import DeviceLanes

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "text, size",
    [("24GiB", 24 * 2**30), ("512MB", 512 * 10**6), ("1.5GB", 1_500_000_000), ("16 gib", 16 * 2**30), ("4096", 4096),
     ("2KiB", 2048), (".5MiB", 2**19), (123456, 123456)],
)
def test_memory_sizes_parse(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["24G", "24 gigs", "GiB", "", "24GiB!", "-1GiB", "1e3MB", "0MB", 0, -5])
def test_bad_memory_sizes_raise_value_error(text):
    with pytest.raises(ValueError):
        parse_memory_size(text)


@pytest.mark.parametrize("value", [1.5, None, True, ["24GiB"]])
def test_memory_sizes_of_wrong_type_raise_type_error(value):
    with pytest.raises(TypeError):
        parse_memory_size(value)


def test_budget_split_into_slots():
    # 3 layers of 10 experts, 100 bytes each; 1000 budget, 130 non-expert, 70 reserve -> 800 for slots:
    # 2 per layer (600), then one more for the first two layers (200).
    plan = split_budget(1000, 130, 70, [100, 100, 100], [10, 10, 10])
    assert plan.slots == (3, 3, 2)
    assert plan.total == 1000 and plan.minimum == 200
    assert split_budget(10**9, 0, 0, [100] * 3, [10] * 3).slots == (10, 10, 10)  # capped at the experts
    assert split_budget(1000, 130, 70, [100] * 3, [10] * 3, slots_per_layer=1).slots == (1, 1, 1)
    assert split_budget(200, 130, 70, [100] * 3, [10] * 3).slots == (0, 0, 0)


def test_budget_below_non_expert_weights_says_what_is_needed():
    with pytest.raises(ValueError, match=r"non-expert weights need 3\.00 GiB.*at least 3\.50 GiB"):
        split_budget(2 * 2**30, 3 * 2**30, 2**29, [100], [8])


def test_more_slots_than_fit_rejected():
    with pytest.raises(ValueError, match="slots_per_layer=3 doesn't fit"):
        split_budget(1000, 130, 70, [100] * 3, [10] * 3, slots_per_layer=3)


def _record(policy: EvictionPolicy, step: dict[int, tuple[int, float]]) -> None:
    """One forward's routing: {expert: (tokens, weight mass)}."""
    experts = torch.tensor(sorted(step))
    policy.record(experts, torch.tensor([step[e][0] for e in sorted(step)]), torch.tensor([step[e][1] for e in sorted(step)]))


def test_lru_evicts_least_recently_routed():
    policy = LRUPolicy(4)
    for step in ({0: (1, 0.5), 1: (1, 0.5)}, {2: (1, 1.0)}, {0: (1, 1.0)}):
        _record(policy, step)
    assert policy.victim([0, 1, 2]) == 1
    policy.inserted(1)  # a fetched expert counts as just used
    assert policy.victim([0, 1, 2]) == 2
    assert policy.victim([3, 0]) == 3  # never used: first out


def test_lfu_evicts_fewest_tokens_ties_least_recent():
    policy = LFUPolicy(4)
    for step in ({0: (5, 1.0), 1: (1, 0.1)}, {2: (3, 0.5), 3: (1, 0.2)}, {2: (2, 0.5)}):
        _record(policy, step)
    assert policy.counts == [5, 1, 5, 1]
    assert policy.victim([0, 1, 2, 3]) == 1  # 1 and 3 tie on count; 1 was used longer ago
    assert policy.victim([0, 2]) == 0
    policy.inserted(1)  # insertion doesn't change frequency
    assert policy.victim([1, 2]) == 1


def test_routing_stats_forgets_old_traffic_where_lfu_does_not():
    sequence = [{1: (8, 4.0)}] + [{2: (1, 1.0)}] * 4  # expert 1: heavy once; expert 2: light, recent
    routing, lfu = RoutingStatsPolicy(3, decay=0.5), LFUPolicy(3)
    for step in sequence:
        _record(routing, step)
        _record(lfu, step)
    assert torch.allclose(routing.scores, torch.tensor([0.0, 4.0 * 0.5**4, 1 + 0.5 + 0.25 + 0.125], dtype=torch.float64))
    assert routing.victim([1, 2]) == 1
    assert lfu.victim([1, 2]) == 2
    # routing weight, not token count: one confident token outweighs three hesitant ones
    policy = RoutingStatsPolicy(3, decay=1.0)
    _record(policy, {0: (1, 0.9), 1: (3, 0.3)})
    assert policy.victim([0, 1]) == 1


def test_policy_factory():
    assert isinstance(policy_factory("lru")(4), LRUPolicy)

    class MostUsedOut(LFUPolicy):
        def _key(self, expert):
            return -self.counts[expert]

    policy = policy_factory(MostUsedOut)(2)
    _record(policy, {0: (3, 1.0), 1: (1, 1.0)})
    assert policy.victim([0, 1]) == 0
    with pytest.raises(ValueError, match="unknown eviction policy"):
        policy_factory("mru")
    with pytest.raises(TypeError):
        policy_factory(3)
    with pytest.raises(ValueError):
        RoutingStatsPolicy(3, decay=0.0)


def test_cost_model_few_tokens_cpu_many_fetch():
    costs = MissCostModel(fetch_s=1.0, cpu_base_s=0.2, cpu_per_token_s=0.1)  # break-even at 8 tokens
    assert not costs.fetch_is_faster(1) and costs.fetch_is_faster(8) and costs.fetch_is_faster(100)
    assert costs.split([1]) == [False]
    assert costs.split([100]) == [True]
    # both lanes run at once: the misses are shared out to finish both soonest
    assert sorted(costs.split([20, 20, 1, 1, 1])) == [False, False, False, True, True]
    assert costs.split([20, 20, 1, 1, 1])[:2] == [True, True]
    balanced = MissCostModel(fetch_s=1.0, cpu_base_s=1.0, cpu_per_token_s=0.0).split([1] * 6)
    assert sum(balanced) == 3


def test_miss_policies():
    costs = MissCostModel(1.0, 0.2, 0.1)
    assert split_misses("fetch", costs, [1, 1], can_fetch=True) == [True, True]
    assert split_misses("cpu", costs, [50, 50], can_fetch=True) == [False, False]
    assert split_misses("auto", costs, [50, 1], can_fetch=True) == [True, False]
    assert split_misses("fetch", costs, [50], can_fetch=False) == [False]  # no free slot


def _weights(experts=6, hidden=24, inter=20, *, bias=False, transposed=False, interleaved=False, act="silu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return ExpertWeights(
        gate_up=gate_up, down=down,
        gate_up_bias=torch.randn(experts, 2 * inter, generator=g) if bias else None,
        down_bias=torch.randn(experts, hidden, generator=g) if bias else None,
        transposed=transposed, interleaved=interleaved, activation=Activation(act),
    )


def test_cache_slots_fill_empty_first_then_policy_victims():
    weights = _weights(bias=True)
    cache = ExpertCache(weights, 3, CPU, LRUPolicy(weights.num_experts))
    lanes = DeviceLanes(CPU)
    assert cache.resident_bytes == 3 * bytes_per_expert(weights)
    assert cache.install(lanes, [(0, 4), (1, 2)]) == 2 * bytes_per_expert(weights)
    assert cache.choose_slots(2) == [2, 1]  # the empty slot first, then the victim (a tie: the lower expert id)
    _record(cache.policy, {4: (1, 1.0)})
    assert cache.choose_slots(2) == [2, 1]  # expert 2 (slot 1) is older than expert 4 (slot 0)
    assert cache.choose_slots(1, keep={2}) == [1]
    assert cache.choose_slots(2, protect={2}) == [2, 0]
    assert cache.choose_slots(3, keep={0, 1, 2}) == []
    cache.install(lanes, [(1, 5)])  # evicts expert 2
    assert cache.slot_of_expert.tolist() == [-1, -1, -1, -1, 0, 1]
    assert cache.expert_in_slot == [4, 5, -1]
    for slot, expert in ((0, 4), (1, 5)):
        assert torch.equal(cache.slots.gate_up[slot], weights.gate_up[expert])
        assert torch.equal(cache.slots.down[slot], weights.down[expert])
        assert torch.equal(cache.slots.gate_up_bias[slot], weights.gate_up_bias[expert])
        assert torch.equal(cache.slots.down_bias[slot], weights.down_bias[expert])


@pytest.mark.parametrize("layout", [{}, {"bias": True, "transposed": True, "interleaved": True, "act": "gelu"}])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_cpu_experts_equal_reference_on_their_pairs(layout, tokens):
    """The CPU share (some experts) equals the reference with every other pair marked -1."""
    weights = _weights(**layout)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, weights.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(weights.num_experts, generator=g)[:3] for _ in range(tokens)])
    routing = torch.rand(tokens, 3, generator=g)
    on_cpu = torch.zeros(weights.num_experts + 1, dtype=torch.bool)
    on_cpu[[1, 3, 4]] = True
    job = plan_cpu_job(ids, routing, on_cpu)
    assert sorted(e for e, _, _ in job.groups) == sorted(set(ids[on_cpu[ids]].tolist()))
    out = torch.zeros(tokens, weights.hidden_size)
    out[job.tokens] = run_cpu_experts(x[job.tokens], weights, job.groups)
    expected = experts_reference(x, weights, torch.where(on_cpu[ids], ids, -1), routing)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not out[~on_cpu[ids].any(dim=1)].any()  # tokens without CPU experts get nothing


def test_copy_lane_clock_backlog_and_spare_copies():
    clock = CopyLaneClock(fetch_s=0.5)
    assert clock.backlog_s() == 0.0 and clock.spare_copies() == 0  # no layer time measured yet
    clock.queued(4)
    assert 1.9 < clock.backlog_s() <= 2.0
    clock.layer_s = 3.0
    assert clock.spare_copies() in (2, 3)  # (3 s - ~2 s backlog) / 0.5 s
    clock.layer_started(0)
    clock.layer_started(1)
    assert 0.0 <= clock.layer_s < 3.0  # moving average toward the measured (tiny) interval
    assert CopyLaneClock(fetch_s=math.inf).spare_copies() == 0
    # queued copies make the cost model send misses to the CPU
    costs = MissCostModel(fetch_s=1.0, cpu_base_s=1.0, cpu_per_token_s=0.0)
    assert costs.split([1, 1], copy_backlog_s=0.0) == [True, False]
    assert costs.split([1, 1], copy_backlog_s=10.0) == [False, False]


def test_removing_an_accelerate_hook_leaves_the_class_forward_in_charge():
    """accelerate's remove_hook_from_module leaves the forward it wrapped as an instance attribute,
    which would hide a later class swap (accelerate() after a device_map dispatch was undone)."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from hf_moe_accel.offload.host_weights import remove_hook_keeping_class_forward

    module = torch.nn.Linear(2, 2)
    add_hook_to_module(module, ModelHook())
    remove_hook_keeping_class_forward(module)
    assert "forward" not in module.__dict__ and not hasattr(module, "_hf_hook")

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    module.__class__ = Doubled
    x = torch.ones(1, 2)
    assert torch.equal(module(x), 2 * torch.nn.functional.linear(x, module.weight, module.bias))


@pytest.mark.parametrize("layout", [{}, {"bias": True, "transposed": True, "interleaved": True, "act": "gelu"}])
def test_cpu_experts_in_float32_match_the_reference_over_chunks(layout, monkeypatch):
    """bf16 weights upcast a chunk at a time (chunks smaller than one expert, uneven at the end):
    the float32 way is closer to the float64 truth than the bf16 way, and experts under the
    crossover still run in bf16."""
    from hf_moe_accel.offload import cpu_experts

    monkeypatch.setattr(cpu_experts, "_UPCAST_CHUNK_ELEMENTS", 7 * 24)  # 7 output features of 24 inputs a chunk
    weights = _weights(**layout)
    half = dataclasses.replace(weights, **{name: getattr(weights, name).bfloat16() for name in
                                          ("gate_up", "down", "gate_up_bias", "down_bias") if getattr(weights, name) is not None})
    wide = dataclasses.replace(weights, **{name: getattr(half, name).double() for name in
                                          ("gate_up", "down", "gate_up_bias", "down_bias") if getattr(half, name) is not None})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, weights.hidden_size, generator=g).bfloat16()
    groups = [(1, torch.arange(9), torch.rand(9, generator=g)), (4, torch.tensor([2, 5]), torch.rand(2, generator=g)),
              (0, torch.tensor([7]), torch.rand(1, generator=g))]  # one token
    truth = run_cpu_experts(x.double(), wide, groups).double()

    def error(upcast_from_tokens):
        out = run_cpu_experts(x, half, groups, upcast_from_tokens)
        return ((out.double() - truth).norm() / truth.norm()).item()

    native, upcast, mixed = error(math.inf), error(1), error(3)  # mixed: expert 1 (9 rows) upcast, 4 and 0 not
    assert upcast < 1e-6 < native < 2e-2
    assert upcast < mixed < native


def test_upcast_crossover_from_the_two_cost_lines():
    native_only = MissCostModel(fetch_s=1.0, cpu_base_s=0.1, cpu_per_token_s=0.01)
    assert native_only.upcast_from_tokens == math.inf and native_only.cpu_s(10) == pytest.approx(0.2)
    slow_native = MissCostModel(1.0, 0.030, 0.001, upcast_base_s=0.002, upcast_per_token_s=0.0005)
    assert slow_native.upcast_from_tokens == 1 and slow_native.cpu_s(4) == pytest.approx(0.004)
    # bf16 fast at one token but growing per token (the GEMM runs a token at a time): float32 from 7 tokens
    per_token_native = MissCostModel(1.0, 0.0002, 0.0007, upcast_base_s=0.0040, upcast_per_token_s=0.0001)
    assert per_token_native.upcast_from_tokens == 7
    assert per_token_native.cpu_s(6) == pytest.approx(0.0002 + 6 * 0.0007)
    assert per_token_native.cpu_s(7) == pytest.approx(0.0040 + 7 * 0.0001)
    never = MissCostModel(1.0, 0.001, 0.0001, upcast_base_s=0.002, upcast_per_token_s=0.0002)
    assert never.upcast_from_tokens == math.inf


def test_calibration_measures_the_float32_way_for_half_precision_weights():
    weights = _weights()
    for dtype, upcast_measured in ((torch.float32, False), (torch.bfloat16, True)):
        half = dataclasses.replace(weights, gate_up=weights.gate_up.to(dtype), down=weights.down.to(dtype))
        cache = ExpertCache(half, 0, CPU, LRUPolicy(half.num_experts))
        costs = calibrate_miss_costs(cache, DeviceLanes(CPU), repeats=1, tokens=4)
        assert costs.fetch_s == math.inf and costs.cpu_base_s + costs.cpu_per_token_s > 0
        assert math.isfinite(costs.upcast_base_s) == upcast_measured


def test_calibration_times_each_cpu_run_on_another_expert(monkeypatch):
    """Cold weights, as a missed expert's are: the CPU runs take the layer's experts in turn."""
    from hf_moe_accel.offload import miss_cost

    used = []
    real = miss_cost.run_cpu_experts

    def spy(x, weights, groups, upcast_from_tokens):
        used.extend(expert for expert, _, _ in groups)
        return real(x, weights, groups, upcast_from_tokens)

    monkeypatch.setattr(miss_cost, "run_cpu_experts", spy)
    weights = _weights()
    cache = ExpertCache(weights, 0, CPU, LRUPolicy(weights.num_experts))
    calibrate_miss_costs(cache, DeviceLanes(CPU), repeats=2, tokens=4)
    assert len(used) == 6 and used == [i % weights.num_experts for i in range(6)]


def test_cpu_time_correction_moves_misses_off_a_slower_cpu():
    """CPU work measured slower than calibrated (host memory shared with the copy lane) gets fewer misses."""
    costs = MissCostModel(fetch_s=1.0, cpu_base_s=1.0, cpu_per_token_s=0.0)
    correction = CpuTimeCorrection(smoothing=0.5)
    assert sum(costs.split([1] * 6, cpu_scale=correction.scale)) == 3  # balanced lanes
    correction.observe(calibrated_s=2.0, measured_s=6.0)  # 3x slower: scale 1 -> 2
    assert correction.scale == pytest.approx(2.0)
    assert sum(costs.split([1] * 6, cpu_scale=correction.scale)) == 4  # copy lane 4 s, CPU lane 2 x 2 s
    correction.observe(calibrated_s=0.0, measured_s=1.0)  # nothing predicted: nothing learnt
    assert correction.scale == pytest.approx(2.0)
    for _ in range(40):
        correction.observe(calibrated_s=1.0, measured_s=1.0)
    assert correction.scale == pytest.approx(1.0, abs=1e-6)
    assert split_misses("auto", costs, [1] * 6, can_fetch=True, cpu_scale=100.0) == [True] * 6
