"""The lossy offload options, off by default: int4 host copies for the misses computed on the CPU
(`OffloadOptions(host_dtype="int4")`) and miss-aware top-k (`miss_drop_threshold`); their rows in
`hf-moe-accel eval --gpu-memory`. CPU only (the CPU stands in for the GPU side), float32."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hf_moe_accel import OffloadOptions, accelerate, offload_stats, unpatch
from hf_moe_accel.bench.quality_offload import OffloadEval
from hf_moe_accel.cli import main
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.offload.engine import offload_engine, set_zero_copy
from hf_moe_accel.offload.host_int4 import INT4_GROUP, dequantize_int4, quantize_int4
from hf_moe_accel.offload.miss_drop import drop_missed

from .helpers import load_fixture
from .test_offload import _tiny_model, expert_modules, options, random_sequences


def test_int4_round_trip_within_half_a_step_and_packs_two_per_byte():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 70, generator=g) * torch.linspace(0.01, 3, 70)  # 70: a zero-padded last group
    weight[0, 0, :32] = 0.25  # a constant group comes back exactly
    packed, scale, minimum = quantize_int4(weight)
    groups = -(-70 // INT4_GROUP)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, groups * INT4_GROUP // 2)
    assert scale.shape == minimum.shape == (3, 5, groups) and scale.dtype == torch.float32
    back = dequantize_int4(packed, scale, minimum, 70)
    assert back.shape == weight.shape
    step = scale.repeat_interleave(INT4_GROUP, dim=-1)[..., :70]
    assert ((back - weight).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(back[0, 0, :32], weight[0, 0, :32])
    # value 2j in byte j's low nibble, 2j + 1 in its high one; codes span [min, max] in 15 steps
    row = torch.arange(32, dtype=torch.float32)
    codes = torch.round(row * 15 / 31).to(torch.uint8)
    packed_row = quantize_int4(row)[0]
    assert torch.equal(packed_row, codes[0::2] | (codes[1::2] << 4))
    assert torch.equal(packed_row & 0xF, codes[0::2]) and torch.equal(packed_row >> 4, codes[1::2])


def _dequantized(host, int4):
    """The layer's experts with int4's dequantized matrices, in the layout stored (biases kept)."""
    def full(matrix):
        values = dequantize_int4(matrix.packed, matrix.scale, matrix.minimum, matrix.in_features)
        return values.transpose(1, 2).contiguous() if host.transposed else values

    return dataclasses.replace(host, gate_up=full(int4.gate_up), down=full(int4.down))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "mixtral"])  # gpt_oss: transposed, interleaved, biases
def test_int4_misses_equal_a_reference_on_the_same_int4_copies(model_type):
    model = _tiny_model(model_type)
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=0, miss_policy="cpu", host_dtype="int4"))
    layer, module = offload_engine(model).layers[0], expert_modules(model)[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    ids[3, 1] = -1  # no expert
    out = module(x, ids, weights)
    expected = experts_reference(x, _dequantized(layer.cache.host, layer.host_int4), ids, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = experts_reference(x, layer.cache.host, ids, weights)
    assert not torch.allclose(out, plain, rtol=1e-5, atol=1e-5)  # the int4 copies were read, not the full ones
    assert offload_stats(model).total.cpu_experts > 0


def _deterministic(**lossy) -> OffloadOptions:
    """eval's simulation (slots from prefetch only, every miss on the CPU): the same cache every run."""
    return dataclasses.replace(OffloadEval("1GiB", slots_per_layer=4).options(torch.device("cpu"), **lossy),
                               reserve="16MiB")


def test_miss_drop_zero_or_none_equals_plain_offload_bitwise(fixture_path):
    model, _ = load_fixture(fixture_path)
    tokens = random_sequences(model, 2, 48)
    logits = {}
    for threshold in (None, 0.0):
        accelerate(model, gpu_memory="1GiB", offload=_deterministic(miss_drop_threshold=threshold))
        with torch.no_grad():
            logits[threshold] = model(tokens).logits
        assert offload_stats(model).total.miss_dropped == 0
        unpatch(model)
    assert torch.equal(logits[None], logits[0.0])


def _expected_drop(ids, weights, missed, threshold, renormalise):
    """The rule spelled out per token: missed pairs under threshold * the token's total dropped (not its
    largest), the rest scaled back to the total where the family renormalises."""
    ids, weights = ids.clone(), weights.clone()
    for t in range(ids.shape[0]):
        total, largest = weights[t].sum(), int(weights[t].argmax())
        drop = [j for j in range(ids.shape[1]) if missed[t, j] and j != largest and weights[t, j] < threshold * total]
        if drop:
            ids[t, drop] = -1
            weights[t, drop] = 0.0
            if renormalise:
                weights[t] = weights[t] * (total / weights[t].sum())
    return ids, weights


@pytest.mark.parametrize("model_type, norm, renormalise", [("qwen3_moe", True, True), ("qwen3_moe", False, False),
                                                          ("gpt_oss", None, True)])
def test_miss_drop_changes_only_tokens_with_dropped_misses_and_renormalises(model_type, norm, renormalise):
    model = _tiny_model(model_type)
    if norm is not None:
        model.config.norm_topk_prob = norm
        for block in model.modules():
            if hasattr(block, "norm_topk_prob"):
                block.norm_topk_prob = norm
    threshold = 0.3
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=3, miss_policy="cpu", prefetch=False,
                                                         miss_drop_threshold=threshold))
    engine = offload_engine(model)
    layer, module = engine.layers[0], expert_modules(model)[0]
    assert layer.drop_renormalises == renormalise
    with torch.no_grad():
        layer.install([(0, 0), (1, 1), (2, 2)])  # experts 0-2 cached, 3-7 missed
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    weights = torch.rand(40, 2, generator=g)
    missed = ids >= 3
    dropped_out = module(x, ids, weights)
    assert offload_stats(model).total.miss_dropped == int((_expected_drop(ids, weights, missed, threshold, renormalise)[0] < 0).sum()) > 0
    engine.miss_drop_threshold = 0.0  # the same cache, nothing dropped
    plain_out = module(x, ids, weights)
    want_ids, want_weights = _expected_drop(ids, weights, missed, threshold, renormalise)
    changed = (want_ids < 0).any(dim=1)
    assert changed.any() and not changed.all()
    assert torch.equal(dropped_out[~changed], plain_out[~changed])  # tokens without a dropped miss: bit for bit
    torch.testing.assert_close(dropped_out, module(x, want_ids, want_weights), rtol=1e-5, atol=1e-6)
    hits_only = (~missed).all(dim=1)
    assert not (changed & hits_only).any()


def test_drop_missed_keeps_the_largest_and_untouched_rows():
    ids = torch.tensor([[4, 5, 6], [1, 2, 3], [7, 8, -1]])
    weights = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.05, 0.95, 0.0]], dtype=torch.bfloat16)
    missed = torch.tensor([[True, True, True], [False, False, False], [True, True, False]])
    new_ids, new_weights, dropped = drop_missed(ids, weights, missed, 0.25, renormalise=True)
    assert new_ids.tolist() == [[-1, -1, 6], [1, 2, 3], [-1, 8, -1]]
    assert dropped.sum() == 3 and new_weights.dtype == torch.bfloat16
    assert torch.equal(new_weights[1], weights[1])  # all hits: untouched
    assert new_weights[0].tolist() == [0.0, 0.0, 1.0] and new_weights[2].tolist() == [0.0, 1.0, 0.0]
    kept = drop_missed(ids, weights, missed, 0.25, renormalise=False)[1]
    assert torch.equal(kept[0], torch.tensor([0.0, 0.0, 0.7], dtype=torch.bfloat16))


def test_miss_drop_in_zero_copy_forwards_equals_the_cache_path():
    """Zero-copy forwards drop on the device (the cache's lookup table says what is cached) and count
    the dropped pairs there; the result equals the cache path's on the same cache."""
    model = _tiny_model("qwen3_moe")
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=3, miss_policy="cpu", prefetch=False,
                                                         zero_copy=True, zero_copy_max_tokens=4, miss_drop_threshold=0.4))
    engine = offload_engine(model)
    layer, module = engine.layers[0], expert_modules(model)[0]
    with torch.no_grad():
        layer.install([(0, 0), (1, 1), (2, 2)])
        layer.cache.device_addresses()
    engine.phase = "decode"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g)
    ids = torch.tensor([[0, 5], [6, 1], [3, 4], [2, 1]])
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    zero_copy = module(x, ids, weights)
    stats = offload_stats(model, "decode").layers[layer.name]
    assert stats.zero_copy_forwards == 1 and stats.miss_dropped == 2 and stats.lookups == 6
    set_zero_copy(model, False)
    torch.testing.assert_close(module(x, ids, weights), zero_copy, rtol=1e-5, atol=1e-5)
    assert offload_stats(model, "decode").layers[layer.name].miss_dropped == 4


@pytest.mark.parametrize("overrides, error", [
    ({"host_dtype": "int8"}, ValueError), ({"host_dtype": "fp8"}, ValueError), ({"host_dtype": 4}, ValueError),
    ({"miss_drop_threshold": 1.0}, ValueError), ({"miss_drop_threshold": -0.1}, ValueError),
    ({"miss_drop_threshold": True}, TypeError), ({"miss_drop_threshold": "0.1"}, TypeError),
    ({"host_dtype": "int4", "miss_policy": "fetch"}, ValueError),
])  # fmt: skip
def test_bad_values_are_refused(overrides, error):
    with pytest.raises(error):
        OffloadOptions(**overrides).validate()


def test_int4_refuses_zero_copy_and_turns_auto_off():
    model = _tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="int4"):
        accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=2, host_dtype="int4", zero_copy=True))
    accelerate(model, gpu_memory="1GiB", offload=options(slots_per_layer=2, host_dtype="int4"))
    assert offload_engine(model).options.zero_copy is False
    assert all(layer.host_int4 is not None for layer in offload_engine(model).layers)


def test_eval_cli_rows_beside_the_offload_row(fixture_path, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    rc = main([
        "eval", "--model", str(fixture_path), "--text", str(fixture_path / "heldout.txt"), "--max-tokens", "256",
        "--prompts", "2", "--prompt-len", "16", "--new-tokens", "3", "--gpu-memory", "1GiB", "--offload-slots", "4",
        "--host-dtype", "int4", "--miss-drop-threshold", "0,0.3", "--json", str(out_json),
    ])  # fmt: skip
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out_json.read_text())["settings"]}
    assert list(rows) == ["stock", "full", "offload", "offload int4", "offload miss_drop=0", "offload miss_drop=0.3"]
    assert rows["offload"]["ppl"] == pytest.approx(rows["full"]["ppl"], rel=1e-4)  # lossless
    assert rows["offload miss_drop=0"]["ppl"] == rows["offload"]["ppl"] and rows["offload miss_drop=0"]["miss_dropped"] == 0
    assert rows["offload int4"]["ppl"] != rows["offload"]["ppl"]
    dropping = rows["offload miss_drop=0.3"]
    assert dropping["miss_dropped"] > 0 and dropping["experts_per_token"] < rows["offload"]["experts_per_token"]
    assert 0 < rows["offload"]["hit_rate"] < 1
    out = capsys.readouterr().out
    assert "| offload int4 |" in out and "hit rate" in out


def test_eval_cli_needs_gpu_memory_for_the_offload_rows(fixture_path, capsys):
    rc = main(["eval", "--model", str(fixture_path), "--text", str(fixture_path / "heldout.txt"), "--host-dtype", "int4"])
    assert rc == 2 and "--gpu-memory" in capsys.readouterr().err
