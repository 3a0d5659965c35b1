"""The cost model at FP8 bytes: block-scaled FP8 experts (and optionally attention) in shapes, memory
fit, decode time, offload traffic, and tensor parallel's whole-block cuts. Pure arithmetic on the CPU."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from hf_moe_accel.costmodel.hardware import hardware_preset
from hf_moe_accel.costmodel.predictor import (
    STREAM_EFFICIENCY,
    PlacementPlan,
    Workload,
    predict,
    tensor_parallel_expert_share,
    tensor_parallel_refusal,
    touched_experts,
)
from hf_moe_accel.costmodel.ranking import candidate_plans, rank_plans
from hf_moe_accel.costmodel.shapes import (
    FP8_BLOCK,
    fp8_matrix_bytes,
    load_shape,
    with_fp8,
)
from hf_moe_accel.parallel.shards import split_blocks
from hf_moe_accel.patches.expert_dtype import BLOCK_SIZE

WORKLOAD = Workload(batch=1, prompt_len=128, new_tokens=128)


@pytest.fixture(scope="module")
def big():
    return load_shape("qwen3-235b-a22b")


@pytest.fixture(scope="module")
def small():
    return load_shape("qwen3-30b-a3b")  # expert inner 768: 6 blocks of 128


def test_block_is_the_quantizers():
    assert (FP8_BLOCK, FP8_BLOCK) == BLOCK_SIZE


def test_fp8_halves_expert_bytes_plus_scales(big):
    fp8 = with_fp8(big)
    hidden, inner = big.hidden_size, big.expert_inner
    scales = 4 * (math.ceil(2 * inner / 128) * math.ceil(hidden / 128) + math.ceil(hidden / 128) * math.ceil(inner / 128))
    assert big.expert_bytes == 2 * 3 * hidden * inner
    assert fp8.expert_bytes == 3 * hidden * inner + scales
    assert fp8.expert_format == "fp8" and fp8.expert_block == 128
    assert fp8.expert_weight_params == big.expert_weight_params  # the same weights to multiply by
    # everything else stays in the model's dtype
    for name in ("attention_bytes", "other_bytes", "embedding_bytes", "lm_head_bytes", "kv_bytes_per_token", "dtype_bytes"):
        assert getattr(fp8, name) == getattr(big, name)
    assert fp8.total_bytes / 2**30 == pytest.approx(226.4, abs=0.1)


def test_fp8_attention_is_optional(big):
    both = with_fp8(big, attention=True)
    assert both.attention_format == "fp8" and both.attention_bytes < 0.51 * big.attention_bytes
    assert both.attention_weight_params == pytest.approx(big.attention_weight_params, rel=1e-3)  # q/k norms aside
    assert with_fp8(both) == both  # already FP8: kept
    assert both.total_bytes < with_fp8(big).total_bytes


def test_fp8_checkpoint_model_reads_as_with_fp8():
    """A model whose experts and attention Transformers' quantizer made FP8 (on the meta device) has the
    sizes `with_fp8(..., attention=True)` counts from its bf16 twin."""
    import torch
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from hf_moe_accel.costmodel.presets import PRESETS
    from hf_moe_accel.costmodel.shapes import shape_of_model

    config = PRESETS["qwen3-30b-a3b"]()
    config.num_hidden_layers = 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    counted = with_fp8(shape_of_model(model), attention=True)
    replace_with_fp8_linear(model, modules_to_not_convert=["lm_head", "mlp.gate"], quantization_config=FineGrainedFP8Config())
    stored = shape_of_model(model)
    assert (stored.expert_format, stored.attention_format, stored.expert_block) == ("fp8", "fp8", 128)
    assert stored.expert_bytes == counted.expert_bytes and stored.expert_params == counted.expert_params
    assert stored.attention_bytes == counted.attention_bytes
    assert stored.attention_weight_params == pytest.approx(counted.attention_weight_params, rel=1e-3)


def test_fp8_matrix_bytes_counts_partial_blocks():
    assert fp8_matrix_bytes(128, 128) == 128 * 128 + 4
    assert fp8_matrix_bytes(129, 100) == 129 * 100 + 2 * 4


def test_fp8_decode_reads_fewer_bytes(small):
    hw = hardware_preset("h100")
    plain = predict(small, hw, PlacementPlan("single", 1, True), WORKLOAD)
    fp8 = predict(with_fp8(small), hw, PlacementPlan("single", 1, True), WORKLOAD)
    fp8_shape = with_fp8(small)
    saved = small.experts_total_bytes - fp8_shape.experts_total_bytes
    assert (plain.memory_gib - fp8.memory_gib) * 2**30 == pytest.approx(saved)
    # HBM-bound at batch 1: the step reads the touched experts' FP8 bytes instead of bf16's
    read_saved = small.moe_layers * touched_experts(small, 1) * (small.expert_bytes - fp8_shape.expert_bytes)
    expected_ms = 1e3 * read_saved / (hw.hbm_tb_s * 1e12 * STREAM_EFFICIENCY)
    assert plain.parts_ms["gpu"] - fp8.parts_ms["gpu"] == pytest.approx(expected_ms, rel=1e-6)


def test_fp8_offload_moves_fp8_bytes(small):
    hw = hardware_preset("h100").with_gpu_memory(16.0)
    plan = PlacementPlan("offload", 1, True)
    plain, fp8 = predict(small, hw, plan, WORKLOAD), predict(with_fp8(small), hw, plan, WORKLOAD)
    assert plain.feasible and fp8.feasible
    # more slots hit and each miss moves about half the bytes
    assert fp8.parts_ms["zero_copy_reads"] < 0.5 * plain.parts_ms["zero_copy_reads"]


@pytest.mark.parametrize("preset", ["h200x8", "h100x8"])
def test_qwen3_235b_fp8_fits_plans_bf16_does_not(big, preset):
    hw = hardware_preset(preset)
    plain = {p.plan: p for p in rank_plans(big, hw, WORKLOAD)}
    ranked = rank_plans(with_fp8(big), hw, WORKLOAD)
    fp8 = {p.plan: p for p in ranked}
    newly = [plan for plan, p in fp8.items() if p.feasible and plan in plain and not plain[plan].feasible]
    assert newly, "FP8 fits no plan bf16 doesn't"
    assert min(p.gpus for p in newly) < min(plan.gpus for plan, p in plain.items() if p.feasible and plan.kind != "offload")
    # ranked: feasible first, fastest first
    feasible = [p for p in ranked if p.feasible]
    assert ranked[: len(feasible)] == feasible
    speeds = [p.decode_tokens_per_s for p in feasible]
    assert speeds == sorted(speeds, reverse=True)
    # every plan that fits in bf16 still fits, with less memory per GPU
    for plan, p in plain.items():
        if p.feasible and plan.kind != "offload":
            assert fp8[plan].feasible and fp8[plan].memory_gib < p.memory_gib


def test_tp_fp8_fewer_blocks_than_ranks_is_refused(small):
    fp8 = with_fp8(small)
    assert -(-fp8.expert_inner // FP8_BLOCK) == 6
    hw = hardware_preset("h100x8")
    refused = predict(fp8, hw, PlacementPlan("tp", 8, True), WORKLOAD)
    assert not refused.feasible and "6 block(s)" in refused.reason and "ep" in refused.reason
    assert tensor_parallel_refusal(fp8, 8)
    # the same model in bf16 splits its 768 columns over 8 ranks
    assert predict(small, hw, PlacementPlan("tp", 8, True), WORKLOAD).feasible
    # "auto" over 8 ranks never picks it
    best = rank_plans(fp8, hw, WORKLOAD, candidate_plans(hw, ("ep", "tp", "dp")))
    assert best[0].feasible and best[0].plan != PlacementPlan("tp", 8, True)


def test_tp_fp8_uneven_blocks_wait_on_largest_share(small):
    fp8 = with_fp8(small)
    # 6 blocks over 4 ranks: 2, 2, 1, 1 (parallel's split_blocks); the step waits on the ranks with 2
    largest = max(e - s for s, e in (split_blocks(768, 128, 4, r) for r in range(4)))
    assert largest == 256
    assert tensor_parallel_expert_share(fp8, 4) == pytest.approx(256 / 768)
    assert tensor_parallel_expert_share(small, 4) == pytest.approx(1 / 4)  # plain columns divide evenly
    hw = hardware_preset("h100x4")
    uneven = predict(fp8, hw, PlacementPlan("tp", 4, True), WORKLOAD)
    even = predict(dataclasses.replace(fp8, expert_block=1), hw, PlacementPlan("tp", 4, True), WORKLOAD)
    assert uneven.feasible and uneven.parts_ms["gpu"] > even.parts_ms["gpu"]
    assert uneven.memory_gib > even.memory_gib
    assert tensor_parallel_expert_share(fp8, 2) == pytest.approx(1 / 2)  # 3 blocks each


def test_tp_fp8_stacked_gate_up_needs_whole_blocks(small):
    odd = dataclasses.replace(with_fp8(small), expert_inner=700)
    assert odd.expert_gate_up_stacked
    assert "share blocks" in tensor_parallel_refusal(odd, 2)


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_moe_accel", "plan", *args], capture_output=True, text=True, timeout=120, check=False)


def test_plan_cli_fp8_prints_fp8_bytes():
    done = _plan_cli("--expert-dtype", "fp8", "--model", "qwen3-235b-a22b", "--hardware", "h200x8")
    assert done.returncode == 0, done.stderr
    assert "experts in FP8" in done.stdout and "226.4 GiB of weights" in done.stdout
    assert "| ep x2 |" in done.stdout  # fits in FP8 on two H200s


@pytest.mark.parametrize("args, message", [
    (["--expert-dtype", "int4"], "unknown expert dtype 'int4'"),
    (["--expert-dtype", "FP8"], "the one choice is 'fp8'"),
    (["--fp8-attention"], "add --expert-dtype fp8"),
])
def test_plan_cli_refuses_bad_values(args, message):
    done = _plan_cli(*args, "--model", "qwen3-235b-a22b", "--hardware", "h200x8")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_fp8_checkpoint_folder_is_counted_in_fp8(tmp_path):
    from hf_moe_accel.costmodel.presets import PRESETS

    config = PRESETS["qwen3-30b-a3b"]()
    config.num_hidden_layers = 2
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    config.save_pretrained(tmp_path)
    shape = load_shape(str(tmp_path))
    assert (shape.expert_format, shape.attention_format) == ("fp8", "fp8")
    del config.quantization_config
    (tmp_path / "plain").mkdir()
    config.save_pretrained(tmp_path / "plain")
    assert load_shape(str(tmp_path / "plain")).expert_format == "model"
