"""uniform_routing: the benchmarks' stand-in for real routing on random-weight models."""

from __future__ import annotations

import pytest
import torch

from hf_moe_accel import OffloadOptions, accelerate, offload_stats, unpatch
from hf_moe_accel.bench.routing import uniform_routing
from hf_moe_accel.kernels.spec import is_experts_module
from hf_moe_accel.offload.miss_cost import MissCostModel

from .helpers import load_fixture


def _record_routing(model) -> tuple[list[torch.Tensor], list]:
    """Hooks (registered after uniform_routing's, so they see what the experts receive) recording each call's ids and weights."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.append((args[1].clone(), args[2].clone()))

    return seen, [m.register_forward_pre_hook(record) for m in model.modules() if is_experts_module(m)]


def test_uniform_routing_draws_distinct_equal_weight_experts_and_leaves_no_trace(fixture_path):
    model, _ = load_fixture(fixture_path, dtype=torch.float32, device="cpu")
    config = model.config.get_text_config()
    sequence = torch.randint(3, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(sequence).logits
        with uniform_routing(model, seed=1):
            seen, handles = _record_routing(model)
            routed = model(sequence).logits
            for handle in handles:
                handle.remove()
        after = model(sequence).logits
    assert torch.equal(before, after)  # the hooks are gone
    assert not torch.allclose(routed, before)  # and while they were there, the experts got other routing
    assert len(seen) == config.num_hidden_layers
    counts = torch.zeros(config.num_local_experts)
    for ids, weights in seen:
        k = config.num_experts_per_tok
        assert ids.shape == (2 * 64, k)
        assert all(len(set(row.tolist())) == k for row in ids)  # k distinct experts per token
        assert torch.allclose(weights, torch.full_like(weights, 1 / k))
        counts += torch.bincount(ids.view(-1), minlength=config.num_local_experts)
    share = counts / counts.sum()
    assert share.max() < 2.0 / config.num_local_experts  # spread over every expert, none favoured


def test_uniform_routing_reaches_the_offloaded_experts_and_is_seeded(fixture_path):
    """Offloaded (CPU stand-in), a cache of a quarter of the experts hits about a quarter of the time."""
    model, _ = load_fixture(fixture_path, dtype=torch.float32, device="cpu")
    experts = model.config.get_text_config().num_local_experts
    costs = MissCostModel(fetch_s=0.0, cpu_base_s=0.0, cpu_per_token_s=0.0)  # every miss fetched
    sequence = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    accelerate(model, gpu_memory="1GiB", offload=OffloadOptions(device="cpu", slots_per_layer=experts // 4, cost_model=costs,
                                                                    prefetch=False))
    try:
        outputs = []
        for _ in range(2):
            with uniform_routing(model, seed=3):
                outputs.append(model.generate(sequence, max_new_tokens=40, min_new_tokens=40, do_sample=False))
        assert torch.equal(*outputs)  # same seed, same draws, same text
        hit_rate = offload_stats(model, "decode").total.hit_rate
    finally:
        unpatch(model)
    assert hit_rate == pytest.approx(0.25, abs=0.08)


def test_uniform_routing_needs_experts_modules():
    with pytest.raises(ValueError, match="no Transformers experts"):
        with uniform_routing(torch.nn.Linear(2, 2)):
            pass


def test_build_preset_overrides_config_fields():
    from hf_moe_accel.costmodel.presets import build_preset

    model = build_preset("qwen3-30b-a3b", "meta", torch.bfloat16, overrides={"num_hidden_layers": 2})
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2 and not model.training
    assert len(build_preset("qwen3-30b-a3b", "meta", torch.bfloat16).model.layers) == 48
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("qwen3", "meta", torch.bfloat16)
