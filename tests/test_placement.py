"""The placement predictor (stated hardware, arithmetic, feasibility, ranking), the `plan` command,
and the placement options of accelerate(): clear errors, the CPU placement, the pipeline's device map."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import transformers

from hf_moe_accel import accelerate, is_accelerated, unpatch
from hf_moe_accel.cli import main
from hf_moe_accel.costmodel.hardware import (
    Hardware,
    hardware_from_json,
    hardware_preset,
)
from hf_moe_accel.costmodel.predictor import (
    RESERVE_GIB,
    STREAM_EFFICIENCY,
    ZERO_COPY_MAX_BATCH,
    PlacementPlan,
    Workload,
    expert_tiles,
    kv_traffic_bytes,
    offload_slot_budget,
    offload_slots_per_layer,
    predict,
    touched_experts,
)
from hf_moe_accel.costmodel.ranking import best_plan, candidate_plans, rank_plans
from hf_moe_accel.costmodel.shapes import ModelShape, load_shape
from hf_moe_accel.parallel.distributed import split_range, tensor_parallel_heads
from hf_moe_accel.parallel.place import placement_of

GIB = 2**30

# Round numbers, so the expected figures can be worked out by hand.
SHAPE = ModelShape(
    name="round", num_layers=2, moe_layers=2, hidden_size=1000, num_heads=8, num_kv_heads=2, head_dim=125, vocab_size=1000,
    num_experts=10, top_k=2, expert_inner=100, dtype_bytes=2, expert_bytes=1e6, attention_bytes=4e6, other_bytes=1e6,
    embedding_bytes=2e6, lm_head_bytes=2e6, tied_embeddings=False, kv_bytes_per_token=2000.0, window_kv_bytes_per_token=0.0,
    sliding_window=0, qkvo_attention=True,
)
HARDWARE = Hardware(
    name="round", gpu_name="round", gpu_count=4, gpu_memory_gib=10.0, hbm_tb_s=1.0, gemm_tflops=100.0, pcie_gb_s=10.0,
    link_gb_s=100.0, link_latency_us=10.0, cpu_gb_s=10.0, cpu_tflops=0.1, host_memory_gib=64.0, eager_layer_host_us=1000.0,
    eager_step_host_us=500.0, graph_step_host_us=100.0, graph_host_exposed_us=40.0, graph_layer_us=20.0,
    offload_layer_host_us=300.0,
)
ONE = Workload(batch=1, prompt_len=10, new_tokens=10)


# ---- stated hardware -------------------------------------------------------------------------


def test_presets_name_gpu_count_and_memory():
    h200x8 = hardware_preset("H200x8")
    assert (h200x8.gpu_count, h200x8.gpu_memory_gib, h200x8.hbm_tb_s) == (8, 139.8, 4.3)
    assert hardware_preset("rtx4090").gpu_memory_gib < 24
    with pytest.raises(ValueError, match="unknown hardware preset 'tpu'.*h100"):
        hardware_preset("tpu")


def test_hardware_json_fills_from_a_base_and_rejects_bad_fields(tmp_path):
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"base": "h100", "gpu_count": 2, "link_gb_s": 50}))
    hardware = hardware_from_json(path)
    assert (hardware.gpu_count, hardware.link_gb_s, hardware.hbm_tb_s) == (2, 50, 3.0)
    path.write_text(json.dumps({"base": "h100", "kernel_gap_us": 3.0}))  # a field older files had: ignored
    assert hardware_from_json(path) == dataclasses.replace(hardware_preset("h100"), source=f"file {path}")
    path.write_text(json.dumps({"base": "h100", "hbm": 3}))
    with pytest.raises(ValueError, match="unknown hardware field.*hbm"):
        hardware_from_json(path)
    path.write_text(json.dumps({"gpu_count": 2}))
    with pytest.raises(ValueError, match="missing field"):
        hardware_from_json(path)
    path.write_text(json.dumps({"base": "h100", "gpu_memory_gib": "lots"}))
    with pytest.raises(ValueError, match="must be a number"):
        hardware_from_json(path)


# ---- the cost model's arithmetic -------------------------------------------------------------


def _bytes_s(nbytes: float) -> float:
    return nbytes / (1e12 * STREAM_EFFICIENCY)


def test_kv_traffic_follows_the_cache_decode_uses():
    # Eager, DynamicCache: mean context 15 tokens x 2000 B read, and torch.cat rewrote it first.
    assert kv_traffic_bytes(SHAPE, ONE, 1, cuda_graphs=False) == (30000, 90000)
    # Graphs, static cache: the 256-token bucket read once (grouped heads folded, no repeat_kv copies).
    assert kv_traffic_bytes(SHAPE, ONE, 1, cuda_graphs=True) == (512000, 512000)
    assert kv_traffic_bytes(SHAPE, Workload(batch=1, prompt_len=200, new_tokens=100), 3, cuda_graphs=True)[0] == 3 * 512 * 2000


def test_single_gpu_step_by_hand():
    # Batch 1: 2 of 10 experts touched per layer.
    experts = 2 * 2 * 1e6  # two layers, two experts each
    weights = 4e6 + 1e6 + 2e6 + 1000 * 2  # attention + other + head + one embedding row
    graph_gpu = _bytes_s(weights + 512000) + _bytes_s(experts)  # KV as in the test above
    graphs = predict(SHAPE, HARDWARE, PlacementPlan("single", 1, True), ONE)
    # The replay (bytes + 2 layers x 20 us) is under the 100 us host loop: the loop bounds the step.
    assert graph_gpu + 40e-6 < 60e-6
    assert graphs.step_ms / 1e3 == pytest.approx(100e-6)
    assert graphs.parts_ms["kernel_floor"] == pytest.approx(2 * 20e-3)
    assert graphs.decode_tokens_per_s == pytest.approx(1e3 / graphs.step_ms)
    # A floor of 50 us per layer makes the replay 117 us: the exposed 40 us of host time precede it.
    slow = predict(SHAPE, dataclasses.replace(HARDWARE, graph_layer_us=50.0), PlacementPlan("single", 1, True), ONE)
    assert slow.step_ms / 1e3 == pytest.approx(40e-6 + graph_gpu + 2 * 50e-6)
    assert slow.parts_ms["host"] == pytest.approx(40e-3)
    eager = predict(SHAPE, HARDWARE, PlacementPlan("single", 1, False), ONE)
    # Eager: host time of 2 layers and the step, serialised with the GPU work, and no graph floor.
    assert eager.step_ms / 1e3 == pytest.approx(_bytes_s(weights + 90000) + _bytes_s(experts) + 2 * 1000e-6 + 500e-6)


def test_collective_counts_and_shares():
    slow_link = dataclasses.replace(HARDWARE, link_latency_us=HARDWARE.link_latency_us + 100.0)
    for kind, collectives in (("ep", SHAPE.moe_layers), ("tp", SHAPE.num_layers + SHAPE.moe_layers)):
        fast, slow = (predict(SHAPE, hw, PlacementPlan(kind, 2, True), ONE) for hw in (HARDWARE, slow_link))
        assert slow.step_ms - fast.step_ms == pytest.approx(collectives * 0.1)  # 100 us more per collective
    single = predict(SHAPE, HARDWARE, PlacementPlan("single", 1, True), ONE)
    tp = predict(SHAPE, HARDWARE, PlacementPlan("tp", 2, True), ONE)
    # Tensor parallel holds half the attention, half of every expert and half the KV heads.
    saved = (SHAPE.attention_bytes + SHAPE.experts_total_bytes) / 2 + SHAPE.kv_bytes(1, ONE.max_context) / 2
    assert (single.memory_gib - tp.memory_gib) * GIB == pytest.approx(saved)
    ep = predict(SHAPE, HARDWARE, PlacementPlan("ep", 4, True), ONE)
    # Expert parallel over 4 ranks: the busiest holds ceil(10 / 4) = 3 experts per layer.
    assert (single.memory_gib - ep.memory_gib) * GIB == pytest.approx(2 * (10 - 3) * 1e6)


def test_expert_parallel_busiest_rank_reads_more_than_its_mean_share():
    ep = predict(SHAPE, HARDWARE, PlacementPlan("ep", 2, True), ONE)
    # 5 local experts, each touched with p = 0.2 at batch 1: mean 1, busiest of 2 ranks 1 + 0.5642.
    busiest_bytes = 2 * (1 + 0.5642) * 1e6
    dense = 4e6 + 1e6 + 2e6 + 512000 + 2000  # graph decode's KV traffic, as in the single-GPU test
    assert ep.parts_ms["gpu"] / 1e3 == pytest.approx(_bytes_s(dense) + _bytes_s(busiest_bytes))


def test_data_parallel_is_one_replica_on_its_share():
    batch8 = Workload(batch=8, prompt_len=10, new_tokens=10)
    dp = predict(SHAPE, HARDWARE, PlacementPlan("dp", 4, True), batch8)
    one = predict(SHAPE, HARDWARE, PlacementPlan("single", 1, True), Workload(batch=2, prompt_len=10, new_tokens=10))
    assert dp.step_ms == pytest.approx(one.step_ms)
    assert dp.decode_tokens_per_s == pytest.approx(8 / (one.step_ms / 1e3))


def test_offload_fills_the_budget_with_expert_slots():
    def with_memory(nbytes: float) -> Hardware:  # a GPU whose offload budget is `nbytes`
        return dataclasses.replace(HARDWARE, gpu_memory_gib=RESERVE_GIB + nbytes / GIB)

    # The engine's reserve (placement/budget.py) for 20 tokens of KV cache and a 10-token prefill:
    # KV 20 x 2 layers x 2 KV heads x (125 + 125) x 2 B; activations 10 x 4 B x (16 x 1000 + 2 x (8 + 2 x 2)
    # x 125 + 2 x 2 x 100); logits 4 x 4 B x 10 x 1000; 128 MiB of workspace.
    reserve = 40000 + 10 * 4 * (16000 + 3000 + 400) + 160000 + 128 * 2**20
    fixed = SHAPE.non_expert_bytes + reserve
    half = with_memory(fixed + 2 * 5 * 1e6)  # and half of each layer's experts
    assert offload_slot_budget(SHAPE, half, ONE).reserve == reserve
    assert offload_slots_per_layer(SHAPE, half, ONE) == 5
    # Experts with biases: decode runs the expert cache (zero-copy reads experts without them).
    biased = dataclasses.replace(SHAPE, expert_biases=True)
    offload = predict(biased, half, PlacementPlan("offload", 1, False), ONE)
    assert offload.feasible and offload.memory_gib == pytest.approx(half.gpu_memory_gib)
    # Hit rate 1/2: one of the 2 touched experts misses per layer. Fetch 1 MB at 10 GB/s = 100 us, CPU 1 MB
    # at 10 GB/s = 100 us; both lanes run together, so the miss is split to end them at once, after the
    # GPU's 2 MB of expert reads.
    gpu = _bytes_s(2e6)
    on_cpu = (gpu + 100e-6) / 200e-6
    layer = max(gpu + (1 - on_cpu) * 100e-6, on_cpu * 100e-6)
    assert offload.parts_ms["experts"] / 1e3 == pytest.approx(2 * layer)
    # Each of the 2 MoE layers syncs with the host once: 300 us each, on top of the eager step.
    assert offload.parts_ms["offload_round_trips"] == pytest.approx(2 * 0.3)
    assert offload.step_ms / 1e3 == pytest.approx(_bytes_s(7e6 + 90000 + 2000) + 2 * layer + 2 * 300e-6 + 2 * 1000e-6 + 500e-6)
    # A budget that holds every expert: accelerate() places the whole model, so the single-GPU figures.
    # (offload plans carry cuda_graphs=False, but the whole model decodes through graphs then)
    everything = predict(SHAPE, with_memory(fixed + 2 * 10 * 1e6), PlacementPlan("offload", 1, False), ONE)
    single = predict(SHAPE, HARDWARE, PlacementPlan("single", 1, True), ONE)
    assert everything.plan == PlacementPlan("offload", 1, False) and everything.step_ms == pytest.approx(single.step_ms)
    no_room = predict(SHAPE, with_memory(fixed * 0.9), PlacementPlan("offload", 1, False), ONE)
    assert not no_room.feasible and "too small" in no_room.reason and offload_slots_per_layer(SHAPE, with_memory(fixed * 0.9), ONE) == 0

    # Zero-copy decode (no biases, batch <= ZERO_COPY_MAX_BATCH), one token: each of the 2 routed pairs per layer reads its expert,
    # the half not cached from host memory at 0.8 x 10 GB/s: 2 layers x 1 pair x 1 MB = 250 us.
    reads_s = 2 * 1e6 / (HARDWARE.zero_copy_share * 10e9)
    zero_copy = predict(SHAPE, half, PlacementPlan("offload", 1, True), ONE)
    assert zero_copy.parts_ms["zero_copy_reads"] / 1e3 == pytest.approx(reads_s)
    assert "offload_round_trips" not in zero_copy.parts_ms and zero_copy.parts_ms["kernel_floor"] == pytest.approx(2 * 0.020)
    # The cached pairs stream from HBM: 2 layers x 1 expert of 1 MB, beside the dense bytes and the
    # static cache's 256-token bucket (as in test_single_gpu_step_by_hand).
    weights = 4e6 + 1e6 + 2e6 + 1000 * 2
    assert zero_copy.parts_ms["gpu"] / 1e3 == pytest.approx(_bytes_s(weights + 512000) + _bytes_s(2e6))
    # Eager: nothing syncs, so the host's 2.5 ms of launches (2 layers x 1 ms + 0.5 ms) run ahead of the
    # GPU's reads; the step is the longer of the two (here the host's).
    eager = predict(SHAPE, half, PlacementPlan("offload", 1, False), ONE)
    assert eager.step_ms / 1e3 == pytest.approx(2.5e-3)
    slow_pcie = dataclasses.replace(half, pcie_gb_s=0.1)  # reads of 25 ms: now the reads bound the step
    assert predict(SHAPE, slow_pcie, PlacementPlan("offload", 1, False), ONE).step_ms / 1e3 == pytest.approx(
        2 * 1e6 / (0.8 * 0.1e9) + _bytes_s(weights + 90000) + _bytes_s(2e6))
    # Several tokens (the grouped kernels): each touched expert read once, 10 x (1 - 0.8^3) = 4.88 of
    # them a layer at batch 3, half from host memory (a hit rate given: the batch's KV takes slots).
    three = predict(SHAPE, half, PlacementPlan("offload", 1, True), Workload(3, 10, 10, hit_rate=0.5))
    assert three.parts_ms["zero_copy_reads"] / 1e3 == pytest.approx(2 * 4.88 * 0.5 * 1e6 / (0.8 * 10e9))
    above = Workload(ZERO_COPY_MAX_BATCH + 1, 1, 1)
    roomy = with_memory(fixed + 10 * 1e6 + 2 * above.batch * 2 * 2000)  # the larger batch's KV beside half the experts
    assert "offload_round_trips" in predict(SHAPE, roomy, PlacementPlan("offload", 1, True), above).parts_ms  # the cache


def test_tensor_parallel_refuses_heads_that_do_not_split():
    assert not predict(SHAPE, HARDWARE, PlacementPlan("tp", 3, True), ONE).feasible  # 8 heads over 3
    assert "KV heads" in predict(dataclasses.replace(SHAPE, num_kv_heads=3, num_heads=12), HARDWARE, PlacementPlan("tp", 4, True), ONE).reason
    assert tensor_parallel_heads(64, 4, 8, 5) == ((40, 48), (2, 3))  # 8 ranks share 4 KV heads: two ranks per head
    assert tensor_parallel_heads(8, 4, 2, 1) == ((4, 8), (2, 4))
    with pytest.raises(ValueError, match="6 attention heads"):
        tensor_parallel_heads(6, 2, 4, 0)


def test_split_range_covers_everything_unevenly():
    parts = [split_range(10, 4, i) for i in range(4)]
    assert parts == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_more_gpus_than_the_hardware_has_is_an_error():
    with pytest.raises(ValueError, match="needs 8 GPUs; the hardware has 4"):
        predict(SHAPE, HARDWARE, PlacementPlan("ep", 8, True), ONE)
    with pytest.raises(ValueError, match="can't run on 2 GPUs"):
        PlacementPlan("single", 2)


# ---- real shapes: feasibility and ranking ----------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_235b() -> ModelShape:
    return load_shape("qwen3-235b-a22b")


def test_qwen3_235b_shape_from_its_config(qwen3_235b):
    assert (qwen3_235b.num_layers, qwen3_235b.moe_layers, qwen3_235b.num_experts, qwen3_235b.top_k) == (94, 94, 128, 8)
    assert qwen3_235b.expert_bytes == 3 * 4096 * 1536 * 2
    assert qwen3_235b.kv_bytes_per_token == 94 * 2 * 4 * 128 * 2
    assert qwen3_235b.total_bytes / 2 == pytest.approx(235.09e9, rel=1e-3)  # parameters


def test_qwen3_235b_on_eight_h200_ranks_feasible_plans_within_memory(qwen3_235b):
    hardware = hardware_preset("h200x8")
    for batch in (1, 32):
        ranked = rank_plans(qwen3_235b, hardware, Workload(batch=batch))
        feasible = [p for p in ranked if p.feasible]
        assert feasible and ranked[: len(feasible)] == feasible, "feasible plans come first"
        speeds = [p.decode_tokens_per_s for p in feasible]
        assert speeds == sorted(speeds, reverse=True)
        assert all(p.memory_gib <= hardware.gpu_memory_gib for p in feasible)
        assert best_plan(ranked).plan.gpus > 1  # 438 GiB of weights need several GPUs
        single = next(p for p in ranked if p.plan.kind == "single")
        assert not single.feasible and "needs" in single.reason
        assert any(p.plan.kind == "offload" for p in ranked), "offload is listed when one GPU can't hold the model"


def test_offload_not_listed_when_the_model_fits():
    ranked = rank_plans(load_shape("olmoe-1b-7b"), hardware_preset("h100"), Workload())
    assert {p.plan.kind for p in ranked} == {"single"}
    assert ranked[0].plan.cuda_graphs, "graph decode is predicted faster than eager"


def test_no_plan_fits_names_every_reason(qwen3_235b):
    tiny_host = dataclasses.replace(hardware_preset("rtx4090"), host_memory_gib=32.0)
    ranked = rank_plans(qwen3_235b, tiny_host, Workload())
    with pytest.raises(ValueError, match="no plan fits.*single.*needs.*offload.*host memory"):
        best_plan(ranked)


def test_candidates_by_kind():
    kinds = {p.kind for p in candidate_plans(hardware_preset("h200x8"), ("ep", "tp"))}
    assert kinds == {"ep", "tp"}
    assert {p.gpus for p in candidate_plans(hardware_preset("h200x8"))} == {1, 2, 4, 8}


# ---- the plan command ------------------------------------------------------------------------


def test_plan_command_prints_and_writes_a_ranked_answer(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "qwen3-235b-a22b", "--hardware", "h200x8", "--batch", "1,32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1 | " in printed and "torchrun --nproc-per-node 8" in printed
    report = json.loads(out.read_text())
    assert [w["batch"] for w in report["workloads"]] == [1, 32]
    top = report["workloads"][0]["predictions"][0]
    assert top["feasible"] and top["memory_gib_per_gpu"] <= 139.8 and top["decode_tokens_per_s"] > 0


def test_plan_command_options_and_errors(capsys):
    assert main(["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--gpu-memory", "16GiB", "--plans", "single,offload"]) == 0
    printed = capsys.readouterr().out
    assert "16 GiB" in printed and "| offload |" in printed
    assert main(["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100x8", "--gpus", "2", "--plans", "ep"]) == 0
    assert "ep x2" in capsys.readouterr().out
    assert main(["plan", "--model", "no-such-model", "--hardware", "h100"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen3-30b-a3b", "--hardware", "tpu"]) == 2
    assert "unknown hardware preset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["plan", "--model", "qwen3-30b-a3b"]) == 2
        assert "--hardware" in capsys.readouterr().err


# ---- accelerate(devices=..., parallel=...) ---------------------------------------------------


def _tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        vocab_size=128, decoder_sparse_step=1, mlp_only_layers=[],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(devices=[99]), ValueError, "doesn't exist here"),
        (dict(devices=[0, 0]) if torch.cuda.is_available() else dict(devices=["cuda:7"]), ValueError, "twice|doesn't exist"),
        (dict(devices="everything"), ValueError, "expected a non-empty list"),
        (dict(parallel="ep"), ValueError, "torchrun --nproc-per-node N"),
        (dict(parallel="zigzag"), ValueError, "expected one of"),
        (dict(devices="cpu", parallel="pp"), ValueError, "needs GPUs"),
        (dict(devices="cpu", gpu_memory="4GiB"), TypeError, "doesn't combine"),
    ],
)
def test_bad_placement_options_raise_before_anything_changes(options, error, message):
    model = _tiny_model()
    with pytest.raises(error, match=message):
        accelerate(model, **options)
    assert not is_accelerated(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_auto_devices_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="found no CUDA GPU"):
        accelerate(_tiny_model(), devices="auto")


def test_cpu_placement_runs_and_unpatch_restores():
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
    accelerate(model, devices="cpu", cuda_graphs=False)
    assert placement_of(model).plan.kind == "single"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, rtol=1e-5, atol=1e-5)
    unpatch(model)
    assert placement_of(model) is None and not is_accelerated(model)


def test_pipeline_device_map_balances_layers_over_gpus():
    from transformers import AutoModelForCausalLM

    from hf_moe_accel.costmodel.presets import PRESETS
    from hf_moe_accel.parallel.pipeline import pipeline_device_map

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(PRESETS["olmoe-1b-7b"](), dtype=torch.bfloat16)
    device_map = pipeline_device_map(model, {0: 10 * GIB, 1: 10 * GIB})
    layers = [device_map[f"model.layers.{i}"] for i in range(16)]
    assert set(layers) == {0, 1} and layers == sorted(layers), "consecutive layers on consecutive GPUs"
    with pytest.raises(ValueError, match="don't fit in the pipeline's GPUs"):
        pipeline_device_map(model, {0: 4 * GIB, 1: 4 * GIB})


# ---- calibration cache -----------------------------------------------------------------------


def test_calibration_cache_round_trip(tmp_path, monkeypatch):
    from hf_moe_accel.costmodel import machine

    monkeypatch.setenv("HF_MOE_ACCEL_CACHE", str(tmp_path))
    path = machine.cache_path()
    assert path.parent == tmp_path and path.name.startswith("calibration-")
    # Transformers' generate() loop sets the host overheads (and deferred stop checks from 5.18): its
    # version is in the key beside torch's.
    assert f"transformers{transformers.__version__}".replace(".", "-") in path.name
    assert machine.load_calibration(path) is None
    path.write_text(json.dumps({"hardware": HARDWARE.to_json(), "seconds": 1.0}))
    assert machine.load_calibration(path) == HARDWARE
    # A cache written before the graph floor and offload figures existed (it had kernel_gap_us instead)
    # reads with those fields' defaults.
    old = {k: v for k, v in HARDWARE.to_json().items() if k not in ("graph_host_exposed_us", "graph_layer_us", "offload_layer_host_us")}
    path.write_text(json.dumps({"hardware": {**old, "kernel_gap_us": 1.0}, "seconds": 1.0}))
    assert machine.load_calibration(path) == dataclasses.replace(
        HARDWARE, graph_host_exposed_us=600.0, graph_layer_us=95.0, offload_layer_host_us=1400.0
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            machine.hardware_of_this_machine()


# ---- on a GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
def test_calibration_is_quick_and_reused(tmp_path, monkeypatch):
    import time

    from hf_moe_accel.bench.calibrate import calibrate

    monkeypatch.setenv("HF_MOE_ACCEL_CACHE", str(tmp_path))
    start = time.perf_counter()
    measured = calibrate(progress=False)
    took = time.perf_counter() - start
    start = time.perf_counter()
    cached = calibrate(progress=False)
    assert took < 60, f"calibration took {took:.0f} s"
    assert time.perf_counter() - start < 1 and cached == measured
    assert 0.5 < measured.hbm_tb_s < 10 and measured.gemm_tflops > 10 and measured.pcie_gb_s > 1
    assert math.isfinite(measured.eager_layer_host_us) and measured.eager_layer_host_us > 0
    # Figures of the tiny models: a graph layer costs some us of GPU time, the offload round trip more.
    # The host's exposed part may come out 0 (every H200 calibration so far): the 24-layer step is its layers.
    assert 1 < measured.graph_layer_us < 1000 and 0 <= measured.graph_host_exposed_us <= measured.graph_step_host_us * 1.5
    assert 10 < measured.offload_layer_host_us < 20000


@pytest.mark.gpu
def test_devices_place_the_model_on_a_gpu():
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
    accelerate(model, devices=[0], cuda_graphs=False)
    assert model.device == torch.device("cuda", 0) and placement_of(model).plan.kind == "single"
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), stock, rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert model.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_pipeline_over_two_gpus_matches_one():
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).logits
    accelerate(model, devices=[0, 1], parallel="pp")
    assert set(model.hf_device_map.values()) == {0, 1}
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda(0)).logits.cpu(), stock, rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert model.device.type == "cpu" and not hasattr(model, "hf_device_map")


def test_measuring_a_plan_times_generate_and_puts_the_model_back():
    from hf_moe_accel.bench.plan_check import PlanMeasurer

    measurer = PlanMeasurer("tiny-qwen3-moe", torch.float32, device=torch.device("cpu"))
    workload = Workload(batch=2, prompt_len=8, new_tokens=4)
    for plan in (PlacementPlan("single", 1, False), PlacementPlan("offload", 1, False)):
        result = measurer.measure(plan, workload, repeats=1, gpu_memory_gib=0.15)  # part of the experts in slots
        assert result["decode_tokens_per_s"] > 0 and result["ttft_s"] > 0
        assert not is_accelerated(measurer.model)


def test_decode_overhead_calibration_runs_on_the_cpu_stand_in(caplog):
    """The calibration's decode-path step (tiny models: eager per layer and step, the offload round
    trip with every expert in a slot) runs end to end on the CPU; its graph figures need CUDA and
    keep the preset's, with a warning."""
    from hf_moe_accel.bench.calibrate import _host_overheads

    with caplog.at_level("WARNING", logger="hf_moe_accel"):
        measured = _host_overheads(torch.device("cpu"))
    assert set(measured) == {"eager_layer_host_us", "eager_step_host_us", "offload_layer_host_us"}
    assert all(value >= 0 for value in measured.values()) and measured["eager_layer_host_us"] > 0
    assert "graph figures stay the preset's" in caplog.text


def test_cpu_expert_rate_is_timed_on_cold_weights():
    """The calibration's CPU expert matmul takes another weight matrix at each run (round robin), so
    that no run finds its weights in the CPU's caches; without a GPU there is no copy lane to keep busy."""
    from hf_moe_accel.bench import calibrate

    weights = [torch.full((2, 3), float(i)) for i in range(3)]
    run = calibrate._cycling(weights, torch.ones(1, 3))
    assert [float(run()[0, 0]) for _ in range(4)] == [0.0, 3.0, 6.0, 0.0]
    rates = calibrate._cpu_rates(None, hidden=64, inner=64, matrices=2)
    assert rates["cpu_gb_s"] > 0 and rates["cpu_tflops"] > 0


@pytest.mark.parametrize("name,tokens,block_m", [("olmoe-1b-7b", 128, 16), ("qwen3-30b-a3b", 128, 16), ("olmoe-1b-7b", 32, 16)])
def test_expert_tiles_match_a_simulation_of_uniform_routing(name, tokens, block_m):
    """The grouped kernels read an expert once per BLOCK_M tile of its pairs: the expected tile count over
    a layer's experts against drawn routings (k distinct experts per token, as bench.routing draws them)."""
    shape = load_shape(name)
    generator = torch.Generator().manual_seed(0)
    draws = 400
    counts = torch.zeros(draws, shape.num_experts)
    for draw in range(draws):
        ids = torch.rand(tokens, shape.num_experts, generator=generator).topk(shape.top_k, dim=-1).indices
        counts[draw] = torch.bincount(ids.flatten(), minlength=shape.num_experts).float()
    simulated = torch.ceil(counts / block_m).sum(dim=1).mean().item()
    assert expert_tiles(shape, tokens, block_m) == pytest.approx(simulated, rel=0.02)
    # Never fewer than the touched experts; equal when a tile holds every token.
    assert expert_tiles(shape, tokens, block_m) >= touched_experts(shape, tokens) - 1e-9
    assert expert_tiles(shape, tokens, tokens) == pytest.approx(touched_experts(shape, tokens))
