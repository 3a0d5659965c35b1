"""CPU expert offload with an expert cache, with the CPU standing in for the GPU side (slots are
CPU tensors; the cache, eviction, miss routing, prefetch and CPU experts run the same code as on
a GPU): outputs equal to stock, budgets respected, loading and unpatching, statistics."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import accelerate as hf_accelerate
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    StoppingCriteria,
    StoppingCriteriaList,
)

import hf_moe_accel
from hf_moe_accel import (
    OffloadOptions,
    accelerate,
    is_accelerated,
    offload_stats,
    reset_offload_stats,
    unpatch,
)
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.offload import host_weights
from hf_moe_accel.offload.engine import (
    decode_hooks,
    is_offloaded,
    offload_budget,
    offload_engine,
    prepare_offload,
    set_miss_policy,
    set_zero_copy,
)
from hf_moe_accel.offload.host_weights import WeightPlacement
from hf_moe_accel.offload.miss_cost import MissCostModel
from hf_moe_accel.state import state_of

from .conftest import FIXTURES
from .helpers import load_fixture, module_classes, state_snapshot
from .test_fixtures import _greedy
from .test_graphs import stand_in_capture

# Fetch a missed expert when it has 3 or more tokens (or the CPU lane is the busier one).
MIXED_COSTS = MissCostModel(fetch_s=1e-4, cpu_base_s=0.0, cpu_per_token_s=3.4e-5)


def options(**overrides) -> OffloadOptions:
    return OffloadOptions(**{"device": "cpu", "reserve": "16MiB", "cost_model": MIXED_COSTS, **overrides})


def random_sequences(model, batch: int = 3, length: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.get_text_config().vocab_size, (batch, length), generator=g)


def expert_modules(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "has_gate")]


NEW_TOKENS = 24


@functools.cache
def stock_outputs(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock greedy tokens and logits of a fixture (stock experts are slow on CPU: computed once)."""
    model, tokenizer = load_fixture(path)
    with torch.no_grad():
        logits = model(random_sequences(model)).logits
    return _greedy(model, tokenizer, NEW_TOKENS), logits


@pytest.mark.parametrize("eviction, miss_policy, prefetch", [("lfu", "auto", True), ("lru", "fetch", False), ("routing", "cpu", True)])
def test_fixture_outputs_equal_stock(fixture_path, eviction, miss_policy, prefetch):
    stock_tokens, stock_logits = stock_outputs(fixture_path)
    model, tokenizer = load_fixture(fixture_path)
    slots = model.config.num_local_experts // 4
    accelerate(model, gpu_memory="1GiB", offload=options(eviction=eviction, miss_policy=miss_policy, prefetch=prefetch, slots_per_layer=slots))
    assert torch.equal(_greedy(model, tokenizer, NEW_TOKENS), stock_tokens)
    with torch.no_grad():
        logits = model(random_sequences(model)).logits
    assert (logits - stock_logits).abs().max() < 1e-4
    total = offload_stats(model).total
    assert total.lookups == total.hits + total.fetched + total.cpu_experts > 0
    assert 0 < total.hits < total.lookups
    if miss_policy == "auto":
        assert total.fetched > 0 and total.cpu_experts > 0
    else:
        assert (total.fetched > 0) == (miss_policy == "fetch") and (total.cpu_experts > 0) == (miss_policy == "cpu")
    assert (total.prefetched > 0) == prefetch


def _offloaded_fixture(path: Path, **overrides):
    """A fixture with a quarter of its experts cached, and a sampled generate() on it."""
    model, tokenizer = load_fixture(path)
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=model.config.num_local_experts // 4, **overrides))
    ids = tokenizer("def main():\n    x = 1\n", return_tensors="pt").input_ids

    def decode(uniform: bool):
        """Decode-phase counters of 24 sampled tokens, with the model's routing or each token's experts
        drawn uniformly."""
        from hf_moe_accel.bench.routing import uniform_routing

        reset_offload_stats(model)
        torch.manual_seed(0)
        with uniform_routing(model, seed=0) if uniform else contextlib.nullcontext():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=True,
                           top_k=0, pad_token_id=0)
        return offload_stats(model, "decode").total

    return decode


def test_prefetch_pauses_where_its_predictions_fail_and_resumes(fixture_path):
    """The next layer's router on this layer's input predicts a trained model's routing well (64-71% of
    the picks on the fixtures): prefetch keeps going. Against uniformly drawn routing its picks are
    chance (25-31%): below prefetch_min_accuracy (0.5) each layer's prefetch pauses, and it copies
    less; with the threshold at 0 it never pauses. Back on the model's own routing it resumes."""
    decode = _offloaded_fixture(fixture_path)
    trained = decode(uniform=False)
    assert trained.prefetch_accuracy > 0.5 and trained.prefetched > 0 and trained.prefetch_hits > 0
    uniform = decode(uniform=True)
    always = _offloaded_fixture(fixture_path, prefetch_min_accuracy=0.0)(uniform=True)
    assert uniform.prefetch_accuracy < 0.4 and always.prefetch_accuracy < 0.4
    assert uniform.prefetch_paused > 0 and always.prefetch_paused == 0
    assert uniform.prefetched < always.prefetched / 2
    assert uniform.predicted > 0  # still checked while paused
    resumed = decode(uniform=False)
    assert resumed.prefetched > 0 and resumed.prefetch_accuracy > 0.5


def _tiny_model(model_type: str, seed: int = 0):
    extra = {
        "qwen3_moe": dict(moe_intermediate_size=16, intermediate_size=48, num_experts=8, norm_topk_prob=True, mlp_only_layers=[],
                          decoder_sparse_step=1),
        "gpt_oss": dict(intermediate_size=16, num_local_experts=8, sliding_window=8),  # biases, transposed, interleaved
        "mixtral": dict(intermediate_size=24, num_local_experts=8),
    }[model_type]
    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8, num_experts_per_tok=2, vocab_size=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                  **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # random biases and routers too (some initialise to zero)
            p.normal_(0, 0.3)
    return model


def _offloaded_logits_equal_stock(model, prompts: list[torch.Tensor], offload: OffloadOptions) -> None:
    """Each prompt's logits, offloaded with `offload` (the forwards in order), equal the stock model's."""
    with torch.no_grad():
        stock = [model(p).logits for p in prompts]
    accelerate(model, gpu_memory="1GiB", offload=offload)
    with torch.no_grad():
        ours = [model(p).logits for p in prompts]
    for s, o in zip(stock, ours):
        assert torch.allclose(o, s, rtol=1e-4, atol=1e-4), (o - s).abs().max()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("miss_policy, slots", [("auto", 2), ("fetch", 1), ("fetch", 8), ("cpu", 0)])
def test_every_path_equals_stock(model_type, miss_policy, slots):
    """One slot with many-token fetches runs in waves; zero slots is all-CPU; 8 caches everything."""
    model = _tiny_model(model_type)
    prompts = [random_sequences(model, batch, length, seed=length) for batch, length in ((1, 1), (2, 7), (4, 50))]
    _offloaded_logits_equal_stock(model, prompts, options(miss_policy=miss_policy, slots_per_layer=slots, prefetch_experts=1))
    experts = expert_modules(model)[0]
    hidden = torch.randn(0, 32)
    empty = experts(hidden, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))
    assert empty.shape == (0, 32)


def test_expert_threshold_drops_pairs_through_the_cache(fixture_path):
    """Pairs dropped by an expert threshold reach the experts as -1 ("no expert")."""
    reference, _ = load_fixture(fixture_path)
    model, _ = load_fixture(fixture_path)
    sequences = random_sequences(model)
    accelerate(reference, expert_threshold=0.3)
    accelerate(model, expert_threshold=0.3, gpu_memory="1GiB", offload=options(slots_per_layer=3))
    with torch.no_grad():
        assert torch.allclose(model(sequences).logits, reference(sequences).logits, rtol=1e-4, atol=1e-4)


def test_budget_respected_by_slots_and_weights(fixture_path):
    model, _ = load_fixture(fixture_path)
    setup = prepare_offload(model, 10**8, options())
    expert_bytes = setup.budget.expert_bytes[0]
    budget = setup.budget.minimum + 11 * expert_bytes + expert_bytes // 2  # room for 11.5 experts
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    accelerate(model, gpu_memory=budget, offload=options())
    plan = offload_budget(model)
    assert sum(plan.slots) == 11 and max(plan.slots) - min(plan.slots) <= 1
    experts = expert_modules(model)
    expert_ids = {id(t) for m in experts for t in (m.gate_up_proj, m.down_proj)}
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in expert_ids)
    engine = offload_engine(model)
    slots = sum(layer.cache.resident_bytes for layer in engine.layers)
    assert weights == plan.non_expert and slots == plan.slot_bytes
    assert weights + slots + plan.reserve <= budget
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before  # host-resident weights not copied


def test_bad_budgets_and_options_rejected_before_anything_changes(fixture_path):
    model, _ = load_fixture(fixture_path)
    classes, state = module_classes(model), state_snapshot(model)
    minimum = prepare_offload(model, 10**9, options()).budget.minimum
    with pytest.raises(ValueError, match=f"at least {minimum / 2**20:.1f} MiB"):
        accelerate(model, gpu_memory=minimum - 1, offload=options())
    for budget in ("24 gigs", "12G", "-1GiB", 0):
        with pytest.raises(ValueError):
            accelerate(model, gpu_memory=budget)
    with pytest.raises(TypeError):
        accelerate(model, gpu_memory=2.5)
    with pytest.raises(TypeError, match="need gpu_memory"):
        accelerate(model, offload=options())
    with pytest.raises(ValueError, match="unknown eviction"):
        accelerate(model, gpu_memory="1GiB", offload=options(eviction="fifo"))
    with pytest.raises(ValueError, match="miss_policy"):
        accelerate(model, gpu_memory="1GiB", offload=options(miss_policy="never"))
    with pytest.raises(ValueError, match="at least one expert slot"):
        accelerate(model, gpu_memory=minimum, offload=options(miss_policy="fetch"))
    with pytest.raises(ValueError, match="slots_per_layer"):
        accelerate(model, gpu_memory=minimum, offload=options(slots_per_layer=1))
    for accuracy in (-0.1, 1.5, "high", True):
        with pytest.raises(ValueError, match="prefetch_min_accuracy"):
            accelerate(model, gpu_memory="1GiB", offload=options(prefetch_min_accuracy=accuracy))
    assert not is_accelerated(model)
    assert module_classes(model) == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unpatch_restores_everything(fixture_path):
    model, _ = load_fixture(fixture_path, dtype=torch.bfloat16)
    classes, state = module_classes(model), state_snapshot(model)
    devices = {n: t.device for n, t in [*model.named_parameters(), *model.named_buffers()]}
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=2))
    with torch.no_grad():
        model(random_sequences(model, 2, 9))
    assert decode_hooks(model).blocked_reason
    assert all("forward" in m.__dict__ for m in expert_modules(model))
    unpatch(model)
    assert module_classes(model) == classes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert {n: t.device for n, t in [*model.named_parameters(), *model.named_buffers()]} == devices
    assert not any("forward" in m.__dict__ for m in expert_modules(model))
    assert state_of(model) is None and not hasattr(model, "hf_device_map")
    assert not model._forward_pre_hooks
    with pytest.raises(ValueError, match="no expert offload"):
        offload_stats(model)


def test_offloading_device_map_is_loaded_run_and_restored(tmp_path):
    """A model that accelerate dispatched with layers offloaded to disk and CPU: its hooks come
    off (offloaded weights materialised once, on the host), outputs match, unpatch puts them back."""
    path = FIXTURES / "tiny-qwen3-moe"
    if not path.is_dir():
        pytest.skip(f"fixture not found at {path}")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
                  "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path).eval()
    sequences = random_sequences(model, 2, 12)
    with torch.no_grad():
        stock = model(sequences).logits
    hooked = {name for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=4))
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(sequences).logits, stock, rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert {name for name, m in model.named_modules() if hasattr(m, "_hf_hook")} == hooked
    assert model.hf_device_map == device_map
    assert model.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"
    with torch.no_grad():
        assert torch.allclose(model(sequences).logits, stock, rtol=1e-5, atol=1e-5)


def test_experts_pinned_one_at_a_time_and_hook_maps_share_them(fixture_path, monkeypatch):
    """With pinning (a GPU side), each expert tensor is copied to pinned memory and swapped in before
    the next is copied, and an offloading hook's weights map is pointed at the copy, so the host
    never holds a second copy of the experts."""
    model, _ = load_fixture(fixture_path)
    state = state_snapshot(model)
    hf_accelerate.cpu_offload(model, execution_device="cpu")  # every weight held by hooks' weights maps
    setup = prepare_offload(model, "1GiB", options())
    modules = [m for _, m in setup.experts]
    copies = []

    class ArenaWithoutCuda(host_weights.PinnedArena):
        def __init__(self, chunk_bytes):
            super().__init__(chunk_bytes, allocate=lambda size: torch.empty(size, dtype=torch.uint8))

        def copy(self, tensor):
            for (module, name), earlier in copies:  # every earlier tensor already points at its copy
                assert getattr(module, name).data_ptr() == earlier.data_ptr()
            copy = super().copy(tensor)
            owner = next((m, n) for m in modules for n in setup.expert_tensor_names[m] if getattr(m, n).data_ptr() == tensor.data_ptr())
            copies.append((owner, copy))
            return copy

    monkeypatch.setattr(host_weights, "PinnedArena", ArenaWithoutCuda)
    placement = WeightPlacement(model, setup.expert_tensor_names, torch.device("cpu"), pin=True)
    assert len(copies) == 2 * len(modules)
    maps = [w.dataset for e in placement.hooks.entries for w in placement.hooks._weights_maps(e.hook)]
    held = {t.data_ptr() for store in [getattr(m, "state_dict", m) for m in maps] for t in store.values()}
    for (module, name), copy in copies:
        assert getattr(module, name).data_ptr() == copy.data_ptr()
        assert copy.data_ptr() in held  # the weights map holds the copy, not the old tensor
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    placement.restore()


def test_pinned_arena_packs_first_fit():
    arena = host_weights.PinnedArena(3000, allocate=lambda size: torch.empty(size, dtype=torch.uint8))
    assert arena.chunk_bytes == 4096
    tensors = [torch.randn(n) for n in (500, 300, 100, 2000)]  # 2000, 1200, 400 and 8000 bytes
    copies = [arena.copy(t) for t in tensors]
    assert [c[0].numel() for c in arena.chunks] == [4096, 8192]  # the 8000-byte tensor gets its own chunk
    assert arena.chunks[0][1] == 2048 + 1536 + 512 and arena.chunks[1][1] == 8192
    assert all(torch.equal(c, t) for c, t in zip(copies, tensors))
    starts = [arena.chunks[0][0].data_ptr()] * 3 + [arena.chunks[1][0].data_ptr()]
    assert all((c.data_ptr() - start) % arena.ALIGN == 0 for c, start in zip(copies, starts))


def test_stats_per_layer_and_phase(fixture_path):
    model, tokenizer = load_fixture(fixture_path)
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=4))
    new_tokens = 10
    _greedy(model, tokenizer, new_tokens)
    stats = hf_moe_accel.offload_stats(model)
    decode, prefill = offload_stats(model, "decode"), offload_stats(model, "prefill")
    assert list(stats.layers) == [f"model.layers.{i}.mlp.experts" for i in range(model.config.num_hidden_layers)]
    for name, layer in decode.layers.items():
        assert layer.forwards == new_tokens - 1 and prefill.layers[name].forwards == 1
        assert stats.layers[name].lookups == layer.lookups + prefill.layers[name].lookups
    total = stats.total
    assert total.pcie_bytes == total.h2d_bytes + total.d2h_bytes > 0
    assert total.cpu_expert_s > 0 and total.cpu_calibrated_s > 0 and 0 <= total.hit_rate <= 1
    # the miss split learns how the CPU work's measured time compares with the calibration
    assert offload_engine(model).cpu_correction.scale != 1.0
    assert "hit rate" in stats.summary() and stats.as_dict()["total"]["lookups"] == total.lookups
    reset_offload_stats(model)
    assert offload_stats(model).total.lookups == 0
    with pytest.raises(ValueError, match="phase"):
        offload_stats(model, "warmup")


def test_miss_policy_switches_in_place(fixture_path):
    model, _ = load_fixture(fixture_path)
    sequences = random_sequences(model, 1, 6)
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=2, prefetch=False))
    for policy in ("cpu", "fetch"):
        set_miss_policy(model, policy)
        reset_offload_stats(model)
        with torch.no_grad():
            model(sequences)
        total = offload_stats(model).total
        assert (total.fetched == 0) == (policy == "cpu") and (total.cpu_experts == 0) == (policy == "fetch")
    with pytest.raises(ValueError):
        set_miss_policy(model, "sometimes")


def test_offload_bench_rows(fixture_path):
    """The bench the `hf-moe-accel bench --gpu-memory` command runs, at a tiny size (CPU stand-in)."""
    from hf_moe_accel.bench.ab import BenchWorkload
    from hf_moe_accel.bench.offload import markdown_table, run_offload_bench

    model, _ = load_fixture(fixture_path)
    rows = run_offload_bench(model, fixture_path.name, "1GiB", [BenchWorkload(2, 8, 4)], repeats=1,
                             options=options(slots_per_layer=2))
    assert [r["system"] for r in rows] == ["stock (cpu)", "ours", "ours fetch-every-miss"]
    ours, fetch = rows[1], rows[2]
    assert ours["decode_tokens_per_s"] > 0 and 0 <= ours["hit_rate"] <= 1 and ours["pcie_bytes_per_token"] > 0
    assert fetch["cpu_experts_per_token"] == 0 and fetch["fetched_per_token"] > 0
    assert ours["speedup_vs_fetch"] == ours["decode_tokens_per_s"] / fetch["decode_tokens_per_s"]
    assert "ours fetch-every-miss" in markdown_table(rows)
    assert not is_accelerated(model) and all(p.device.type == "cpu" for p in model.parameters())


def test_offload_bench_round_trip_row():
    """With zero-copy on, `round_trip_row` adds ours with it off (the cache's round trip), same run."""
    from hf_moe_accel.bench.ab import BenchWorkload
    from hf_moe_accel.bench.offload import run_offload_bench

    model = _tiny_model("qwen3_moe")
    rows = run_offload_bench(model, "tiny", "1GiB", [BenchWorkload(1, 8, 3)], repeats=1, stock_batches=[],
                             options=options(slots_per_layer=2, zero_copy=True), round_trip_row=True)
    assert [r["system"] for r in rows] == ["ours", "ours, no zero-copy", "ours fetch-every-miss"]
    assert rows[1]["cpu_experts_per_token"] + rows[1]["fetched_per_token"] > 0  # misses the cache served itself
    assert rows[0]["cpu_experts_per_token"] == rows[0]["fetched_per_token"] == 0  # zero-copy reads them in place


def test_offload_bench_sizes_the_reserve_for_its_largest_workload():
    """Every run keeps to the budget: one accelerate() serves all workloads, its reserve sized for the
    largest prefill and static cache among them (never below the options' own)."""
    from hf_moe_accel.bench.ab import BenchWorkload
    from hf_moe_accel.bench.offload import _sized_for

    small = _sized_for(OffloadOptions(), [BenchWorkload(1, 128, 16), BenchWorkload(8, 128, 16)])
    assert (small.prefill_tokens, small.kv_cache_tokens) == (4096, 8192)  # the defaults hold them
    large = _sized_for(OffloadOptions(), [BenchWorkload(1, 128, 16), BenchWorkload(128, 128, 200)])
    assert (large.prefill_tokens, large.kv_cache_tokens) == (128 * 128, 128 * 512)  # 328 positions: bucket 512


def test_bench_command_with_a_gpu_budget(fixture_path, tmp_path, capsys):
    """`hf-moe-accel bench --model PATH --gpu-memory X`: the offload comparison, its table, per-layer JSON, plot."""
    from hf_moe_accel.cli import main

    out, png = tmp_path / "offload.json", tmp_path / "offload.png"
    plan = prepare_offload(load_fixture(fixture_path)[0], 10**9, OffloadOptions(device="cpu")).budget
    half = plan.minimum + sum(b * n for b, n in zip(plan.expert_bytes, plan.num_experts)) // 2  # half the experts
    args = ["bench", "--model", str(fixture_path), "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "3",
            "--repeats", "1", "--json", str(out), "--plot", str(png)]
    assert main([*args, "--gpu-memory", "1GiB"]) == 2  # holds the whole model: nothing to offload
    assert "nothing to offload" in capsys.readouterr().err
    assert main([*args, "--gpu-memory", "12G"]) == 2  # refused before the model is loaded
    assert "can't read memory size '12G'" in capsys.readouterr().err
    assert main([*args, "--gpu-memory", str(half), "--stock-new-tokens", "1"]) == 2
    assert "--stock-new-tokens must be at least 2" in capsys.readouterr().err
    assert main([*args, "--no-zero-copy"]) == 2
    assert "--no-zero-copy is an option of expert offload" in capsys.readouterr().err
    assert main([*args, "--gpu-memory", str(half)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["system"], r["batch"]) for r in rows] == [
        ("stock (cpu)", 1), ("ours", 1), ("ours fetch-every-miss", 1), ("ours", 2), ("ours fetch-every-miss", 2)]
    layers = rows[1]["decode_stats"]["layers"]
    assert len(layers) == load_fixture(fixture_path)[0].config.num_hidden_layers
    assert sum(layer["lookups"] for layer in layers.values()) == rows[1]["decode_stats"]["total"]["lookups"] > 0
    printed = capsys.readouterr().out
    assert "| ours fetch-every-miss |" in printed and "decode hit rate" in printed and png.stat().st_size > 0


def test_failure_halfway_leaves_the_model_as_it_was(fixture_path, monkeypatch):
    from hf_moe_accel.offload import engine as offload

    model, _ = load_fixture(fixture_path)
    classes, state = module_classes(model), state_snapshot(model)
    made, real_cache = [], offload.ExpertCache

    def cache_then_fail(*args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("out of memory (simulated)")
        made.append(real_cache(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(offload, "ExpertCache", cache_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=2))
    assert not is_accelerated(model) and module_classes(model) == classes
    assert not any("forward" in m.__dict__ for m in expert_modules(model)) and not model._forward_pre_hooks
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_budget_that_holds_every_expert_places_the_model_whole(fixture_path, caplog):
    """No expert cache when every expert fits (its host round trips would only slow decode and rule
    out graph decode): the model goes to the device as a whole; with slots asked for, it offloads."""
    from hf_moe_accel.parallel.place import placement_of

    model, _ = load_fixture(fixture_path)
    sequences = random_sequences(model, 2, 12)
    with torch.no_grad():
        stock = model(sequences).logits
    with caplog.at_level("INFO", logger="hf_moe_accel"):
        accelerate(model, gpu_memory="1GiB", offload=OffloadOptions(device="cpu"))
    assert not is_offloaded(model) and placement_of(model).plan.kind == "single"
    assert "the whole model fits in gpu_memory" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(sequences).logits, stock, rtol=1e-4, atol=1e-4)
    unpatch(model)
    accelerate(model, gpu_memory="1GiB", offload=OffloadOptions(device="cpu", slots_per_layer=2))
    assert is_offloaded(model)
    unpatch(model)


def test_zero_copy_decode_equals_stock(fixture_path):
    """Decode steps read every routed expert where it is (slots, or host memory) in one kernel call per
    layer; prefill still fills the slots, and the address tables follow its installs. Tokens and
    logits equal stock's (one prompt, one decode step: the interpreter is slow at the fixture's size)."""
    model, tokenizer = load_fixture(fixture_path)
    ids = tokenizer("def main():\n    x = 1\n", return_tensors="pt").input_ids
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False,
                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    stock = model.generate(ids, **kwargs)
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=model.config.num_local_experts // 4,
                                                          zero_copy=True, zero_copy_max_tokens=1))
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    decode, prefill = offload_stats(model, "decode").total, offload_stats(model, "prefill").total
    assert decode.zero_copy_forwards == decode.forwards > 0
    assert decode.lookups == decode.forwards * model.config.num_experts_per_tok  # one token a forward: its k pairs
    assert decode.h2d_bytes == (decode.lookups - decode.hits) * offload_engine(model).layers[0].cache.expert_bytes
    assert prefill.zero_copy_forwards == 0 and prefill.fetched > 0  # prefill moved experts in and out
    assert "zero-copy" in offload_stats(model, "decode").summary()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("slots", [0, 2, 8])
def test_zero_copy_forwards_equal_stock_between_cache_changes(model_type, slots):
    """Few-token forwards (zero-copy) between many-token ones (which evict and install): each equals stock."""
    model = _tiny_model(model_type)
    prompts = [random_sequences(model, batch, length, seed=seed)
               for seed, (batch, length) in enumerate(((1, 1), (2, 9), (2, 1), (3, 30), (1, 2), (3, 1)))]
    _offloaded_logits_equal_stock(model, prompts, options(slots_per_layer=slots, zero_copy=True, zero_copy_max_tokens=3))
    total = offload_stats(model).total
    # the three forwards of one new token a sequence, <= 3 sequences; not the 2-token prompt (prefill)
    assert total.zero_copy_forwards == 3 * len(expert_modules(model))
    for layer in offload_engine(model).layers:  # cached experts are read from their slots
        cache = layer.cache
        table, slots = cache.device_addresses().gate_up, cache.slots.gate_up
        for expert, slot in enumerate(cache.slot_of_expert.tolist()):
            tensor, row = (slots, slot) if slot >= 0 else (cache.host.gate_up, expert)
            assert table[expert] == tensor[row].data_ptr()


def test_zero_copy_counts_routed_pairs_and_hits_on_the_device():
    """Each zero-copy forward adds its routed pairs, those whose expert sits in a slot, and the experts
    it reads from host memory to device counters (no host round trip): the grouped path (several
    tokens) reads a shared expert once, the decode path (one token) once per pair; -1 pairs (no
    expert) count as none. Every larger forward leaves its cache's address table current, so a graph
    replay (which runs no Python) reads current tables."""
    model = _tiny_model("qwen3_moe")
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=3, zero_copy=True, zero_copy_max_tokens=2))
    engine = offload_engine(model)
    with torch.no_grad():
        model(random_sequences(model, 2, 9))  # fills slots
    for layer in engine.layers:
        assert not layer.cache.addresses_stale
        assert torch.equal(layer.cache.lookup_values()[:-1] - (1 << 32), (layer.cache.slot_of_expert >= 0).long())
    routed = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: routed.append(args[1].clone())) for m in expert_modules(model)]
    reset_offload_stats(model)
    with torch.no_grad():
        model(random_sequences(model, 2, 1, seed=5))
    for hook in hooks:
        hook.remove()
    decode = offload_stats(model, "decode")
    for layer, ids in zip(engine.layers, routed):
        counted = decode.layers[layer.name]
        assert counted.lookups == ids.numel() == 4
        assert counted.hits == int((layer.cache.slot_of_expert[ids] >= 0).sum())
        host_experts = {e for e in ids.view(-1).tolist() if layer.cache.slot_of_expert[e] < 0}
        assert counted.h2d_bytes == len(host_experts) * layer.cache.expert_bytes

    layer0, module0 = engine.layers[0], expert_modules(model)[0]
    first, second = (int(e) for e in (layer0.cache.slot_of_expert < 0).nonzero()[:2])  # uncached experts

    def counted() -> tuple[int, int, int]:
        stats = offload_stats(model, "decode").layers[layer0.name]
        return stats.lookups, stats.hits, stats.h2d_bytes // layer0.cache.expert_bytes

    def counted_after(ids: list[list[int]]) -> tuple[int, int, int]:
        layer0.forward(module0, torch.randn(len(ids), 32), torch.tensor(ids), torch.ones(len(ids), 2))
        return counted()

    start = counted()
    # two tokens (grouped path): `first` shared by both pairs is read once
    assert counted_after([[first, -1], [first, second]]) == (start[0] + 3, start[1], start[2] + 2)
    # one token (decode path): -1 counts as nothing
    assert counted_after([[-1, first]]) == (start[0] + 4, start[1], start[2] + 3)
    reset_offload_stats(model)
    assert offload_stats(model).total.lookups == 0


def test_zero_copy_decode_replays_graphs_and_equals_stock(caplog):
    """With zero-copy, decode steps of up to zero_copy_max_tokens sequences replay graphs (CPU
    stand-in here): tokens equal stock's, the offloaded experts' map no longer blocks graphs, and the
    device counters keep counting. Larger batches, zero-copy switched off, or a static cache beyond
    the budget's KV room decode eagerly, with the reason logged."""
    model = _tiny_model("qwen3_moe")
    prompt = random_sequences(model, 1, 6)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    stock = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    stock_batch = model.generate(random_sequences(model, 3, 6), **kwargs)
    accelerate(model, gpu_memory="1GiB", cuda_graphs=False,
               offload=options(slots_per_layer=3, zero_copy=True, zero_copy_max_tokens=2, kv_cache_tokens=300))
    hooks = decode_hooks(model)
    assert hooks.blocked_reason is None and hooks.step_blocker is not None
    enable_graph_decode(model, GraphBackend("cpu", stand_in_capture), hooks=hooks)
    ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(ours, stock)
    stats = graph_stats(model)
    assert stats["captures"] == 1 and stats["replays"] == 4 and not stats["blocked_steps"]
    assert offload_stats(model, "decode").total.lookups > 0
    assert torch.equal(model.generate(random_sequences(model, 3, 6), **kwargs), stock_batch)  # batch 3 > 2: eager
    assert graph_stats(model)["replays"] == 4
    set_zero_copy(model, False)
    with caplog.at_level(logging.WARNING, logger="hf_moe_accel"):
        assert torch.equal(model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), stock)
    assert graph_stats(model)["replays"] == 4 and "zero-copy decode off" in caplog.text
    set_zero_copy(model, True)

    class SwitchOffAtStep(StoppingCriteria):  # zero-copy switched off between two steps of one call
        calls = 0

        def __call__(self, input_ids, scores, **kw):
            self.calls += 1
            if self.calls == 2:
                set_zero_copy(model, False)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    switched = model.generate(prompt, attention_mask=torch.ones_like(prompt), stopping_criteria=StoppingCriteriaList([SwitchOffAtStep()]), **kwargs)
    assert torch.equal(switched, stock)
    stats = graph_stats(model)
    assert stats["replays"] == 4 + 1 and sum(stats["blocked_steps"].values()) == 3  # the steps after the switch: eager
    set_zero_copy(model, True)
    long_prompt = random_sequences(model, 1, 260)  # a 512-position cache: beyond kv_cache_tokens
    assert model.generate(long_prompt, attention_mask=torch.ones_like(long_prompt), **kwargs).shape[1] == 265
    assert graph_stats(model)["replays"] == 5 and "KV cache" in caplog.text


@pytest.mark.parametrize("graphs", [True, False])
def test_zero_copy_refill_between_decode_steps_equals_stock(graphs):
    """Every 2 decode steps the most used uncached experts are copied into the least used slots (and the
    address tables refreshed before the next step reads them): tokens still equal stock's, through graph
    replays (CPU stand-in) and eagerly."""
    model = _tiny_model("qwen3_moe")
    prompt = random_sequences(model, 1, 6)
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    stock = model.generate(prompt, **kwargs)
    accelerate(model, gpu_memory="1GiB", cuda_graphs=False,
               offload=options(slots_per_layer=3, zero_copy=True, zero_copy_max_tokens=2, zero_copy_refill_every=2))
    if graphs:
        enable_graph_decode(model, GraphBackend("cpu", stand_in_capture), hooks=decode_hooks(model))
    assert torch.equal(model.generate(prompt, **kwargs), stock)
    assert offload_stats(model, "decode").total.refilled > 0
    if graphs:
        assert graph_stats(model)["replays"] > 0
    for layer in offload_engine(model).layers:  # the tables follow the refills
        cache = layer.cache
        for expert, slot in enumerate(cache.slot_of_expert.tolist()):
            tensor, row = (cache.slots.gate_up, slot) if slot >= 0 else (cache.host.gate_up, expert)
            assert cache.device_addresses().gate_up[expert] == tensor[row].data_ptr()


def _stand_in_without_host_steps(engine):
    """The CPU stand-in capture, with replays that, like a CUDA graph's, run none of the engine's host
    work per step (the stand-in re-runs the forward, hooks and all; the runner's before_replay is that
    work): device counters still count."""

    def capture(forward, pool):
        replay, output = stand_in_capture(forward, pool)

        def replay_device_work_only() -> None:
            engine._rehearsing = True
            try:
                replay()
            finally:
                engine._rehearsing = False

        return replay_device_work_only, output

    return capture


def test_graph_decode_counts_and_refills_as_eager_decode():
    """A capture's warm-up and the capture run a step that the replay repeats: they count no step and
    leave the device counters as they were. So graph decoding refills the same experts at the same
    steps as eager decoding and counts the same lookups and hits, over calls of different prompts and
    batch sizes (each size a new capture). Misses are fetched: the "auto" split of prefill's misses weighs
    the copy lane's measured backlog, which differs from run to run."""
    opts = options(slots_per_layer=3, zero_copy=True, zero_copy_max_tokens=2, zero_copy_refill_every=3, miss_policy="fetch")
    models = {}
    for graphs in (True, False):
        models[graphs] = _tiny_model("qwen3_moe")
        accelerate(models[graphs], gpu_memory="1GiB", cuda_graphs=False, offload=opts)
    engine = offload_engine(models[True])
    enable_graph_decode(models[True], GraphBackend("cpu", _stand_in_without_host_steps(engine)), hooks=decode_hooks(models[True]))
    for call, (batch, length) in enumerate([(1, 6), (2, 9), (1, 4)]):
        prompt = random_sequences(models[True], batch, length, seed=call)
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens = {graphs: model.generate(prompt, **kwargs) for graphs, model in models.items()}
        assert torch.equal(tokens[True], tokens[False]), call
        stats = {graphs: offload_stats(model, "decode").total for graphs, model in models.items()}
        assert (stats[True].lookups, stats[True].hits, stats[True].refilled) == \
            (stats[False].lookups, stats[False].hits, stats[False].refilled), call
        for graph_layer, eager_layer in zip(engine.layers, offload_engine(models[False]).layers):
            assert torch.equal(graph_layer.cache.slot_of_expert, eager_layer.cache.slot_of_expert), call
    assert stats[True].refilled > 0
    assert graph_stats(models[True])["captures"] >= 2 and graph_stats(models[True])["replays"] == 3 * 7


def test_zero_copy_refill_swaps_used_experts_for_unused_ones():
    model = _tiny_model("qwen3_moe")
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=3, zero_copy=True, zero_copy_refill_every=3))
    engine = offload_engine(model)
    with torch.no_grad():
        model(random_sequences(model, 2, 9))  # fills the slots
    cache = engine.layers[0].cache
    cached = [e for e in range(8) if cache.slot_of_expert[e] >= 0]
    uncached = [e for e in range(8) if cache.slot_of_expert[e] < 0]
    use = engine.expert_use(0)
    use[uncached[0]], use[uncached[1]], use[cached[0]], use[-1] = 9, 1, 5, 7  # the sentinel column (-1 ids) is ignored
    engine.before_decode_step()
    engine.before_decode_step()
    assert cache.slot_of_expert[uncached[0]] < 0  # not yet: every 3 steps
    engine.before_decode_step()
    # The 3 most used (uncached[0], cached[0], uncached[1]) now all sit in slots; one of the unused cached went.
    assert all(cache.slot_of_expert[e] >= 0 for e in (uncached[0], cached[0], uncached[1]))
    assert sum(cache.slot_of_expert[e] >= 0 for e in cached[1:]) == 0
    assert offload_stats(model, "decode").layers[engine.layers[0].name].refilled == 2
    assert not cache.addresses_stale and int(engine.expert_use(0).sum()) == 0
    with pytest.raises(ValueError, match="zero_copy_refill_every"):
        OffloadOptions(zero_copy_refill_every=-1).validate()


def test_zero_copy_refuses_biased_experts_and_bad_sizes():
    with pytest.raises(ValueError, match="biases"):
        accelerate(_tiny_model("gpt_oss"), gpu_memory="1GiB", offload=options(zero_copy=True))
    with pytest.raises(ValueError, match="zero_copy_max_tokens"):
        accelerate(_tiny_model("qwen3_moe"), gpu_memory="1GiB", offload=options(zero_copy=True, zero_copy_max_tokens=0))
