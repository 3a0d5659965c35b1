"""FP8 experts under expert and tensor parallel, and shard-only loading of an FP8 checkpoint, over 2 gloo
processes (issues 31 and 34).

The pytest process writes an FP8 checkpoint (the tiny-qwen3-moe fixture's experts quantized per expert by
`quantize_blocks`, the rule `expert_dtype="fp8"` uses, stored as Transformers' FP8 quantizer stores them:
float8_e4m3fn `experts.N.*.weight`, float32 `*.weight_scale_inv`, a config with a FineGrainedFP8Config-like
`quantization_config`) and launches this file under torchrun in worker mode, as test_distributed.py does.
Every rank builds the same models and saves what it gave:

- "fp8-experts": the fixture whose experts Transformers' `replace_with_fp8_linear` made FP8Experts, holding
  the same quantized weights as the checkpoint; `accelerate(model, parallel=...)`;
- "expert-dtype": the tiny-mixtral fixture, `accelerate(model, expert_dtype="fp8", parallel=...)`, then
  `unpatch` (the originals kept) must give the model back bitwise;
- "loaded": the FP8 checkpoint read by `load_for_rank` (each rank's bytes counted, its tensors compared with
  the fp8-experts model cut by the same rule), then accelerated;
- "kernels": a small random FP8Experts model in float16 whose inner size is 3 blocks of 32 (an uneven split
  of blocks), one forward through the Triton kernels (Triton's interpreter on the CPU);
- refusals: tensor parallel where gate and up rows share a block (inner 72, expert_dtype's 128 blocks), and
  where there are fewer blocks than ranks (inner 128 in one 128 block).

The tests compare the ranks' results with one process accelerating the same FP8 experts. The unit tests at
the end check the slicing rule itself on meta-device models (no processes).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import FIXTURES, PROMPTS, _torchrun, run_case, torchrun_env

WORLD = 2
BLOCK = (128, 128)
KEEP_UNQUANTIZED = ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]  # Transformers' FP8 linear needs a GPU kernel
QUANTIZATION_CONFIG = {"quant_method": "fp8", "weight_block_size": list(BLOCK), "activation_scheme": "dynamic",
                       "modules_to_not_convert": KEEP_UNQUANTIZED}
FIXTURE_NAMES = ("tiny-qwen3-moe", "tiny-mixtral")
# Random qwen3_moe configs: the float16 kernel case (inner 96 = 3 blocks of 32), and the two refusals.
KERNEL_CONFIG = dict(hidden_size=64, moe_intermediate_size=96, num_experts=6, block=(32, 32))
SHARED_BLOCK_CONFIG = dict(hidden_size=64, moe_intermediate_size=72, num_experts=4)
FEW_BLOCKS_CONFIG = dict(hidden_size=128, moe_intermediate_size=128, num_experts=4, block=BLOCK)


def _have_fixtures() -> bool:
    return all((FIXTURES / name).is_dir() for name in FIXTURE_NAMES)


def _experts(model) -> list:
    from hf_moe_accel.kernels.spec import is_experts_module

    return [m for m in model.modules() if is_experts_module(m)]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (float8 has no torch.equal on the CPU)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)


# ---- the models (the same in every process) ----------------------------------------------------


def make_fp8_experts(model, block: tuple[int, int] = BLOCK):
    """`model` with its experts made Transformers' FP8Experts (its own `replace_with_fp8_linear`), holding
    the experts' weights quantized by `quantize_blocks`."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from hf_moe_accel.kernels.experts_fp8_reference import quantize_blocks

    dense = {name: {p: getattr(m, p).detach() for p in ("gate_up_proj", "down_proj")}
             for name, m in model.named_modules() if m in _experts(model)}
    replace_with_fp8_linear(model, modules_to_not_convert=KEEP_UNQUANTIZED,
                            quantization_config=FineGrainedFP8Config(weight_block_size=block))
    for name, weights in dense.items():
        experts = model.get_submodule(name)
        experts.to_empty(device="cpu")
        for proj, weight in weights.items():
            stored, scale = quantize_blocks(weight, block)
            getattr(experts, proj).data.copy_(stored)
            grid = getattr(experts, f"{proj}_scale_inv").data
            grid.fill_(float("nan"))  # rows past the weight's blocks (FP8Experts allocates at least 2): never read
            grid[:, : scale.shape[1], : scale.shape[2]].copy_(scale)
    return model.eval()


def fixture_case(name: str, fp8_experts: bool, dtype: torch.dtype = torch.float32):
    """(model in eval mode, generate() inputs): a fixture in `dtype`, its experts FP8Experts or not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    tokenizer.padding_side = "left"
    return (make_fp8_experts(model) if fp8_experts else model), dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))


def random_case(config: dict, dtype: torch.dtype = torch.float32, fp8_experts: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    block = settings.pop("block", BLOCK)
    config = AutoConfig.for_model("qwen3_moe", intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts_per_tok=2,
                                  **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    return (make_fp8_experts(model, block) if fp8_experts else model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def kernel_logits(model, inputs) -> torch.Tensor:
    """One forward with block-scaled experts sent to the Triton kernels (on CPU tensors: Triton's interpreter)."""
    import hf_moe_accel.kernels as kernels
    from hf_moe_accel.kernels import experts_triton

    calls = []
    real_serve, real_kernel = kernels.block_scaled_kernels_serve, experts_triton.fused_experts_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real_kernel(*args, **kwargs)

    kernels.block_scaled_kernels_serve, experts_triton.fused_experts_triton = (lambda hidden_states, weights: True), spy
    try:
        logits = model(**inputs).logits
    finally:
        kernels.block_scaled_kernels_serve, experts_triton.fused_experts_triton = real_serve, real_kernel
    assert len(calls) == len(_experts(model)), "the Triton kernels didn't serve every experts module"
    return logits


# ---- the FP8 checkpoint (pytest process) -------------------------------------------------------


def write_fp8_checkpoint(source: Path, target: Path) -> None:
    """`source`'s single-file checkpoint with every per-expert weight stored as Transformers' FP8 quantizer
    stores it (float8_e4m3fn weight, float32 `weight_scale_inv` per 128 x 128 block), the rest in float32,
    in two files and an index; its config carries the quantization_config."""
    from safetensors.torch import load_file, save_file

    from hf_moe_accel.kernels.experts_fp8_reference import quantize_blocks

    target.mkdir(parents=True)
    tensors = {}
    for key, tensor in load_file(source / "model.safetensors").items():
        if re.search(r"experts\.\d+\.\w+\.weight$", key):
            tensors[key], tensors[f"{key}_scale_inv"] = quantize_blocks(tensor.float(), BLOCK)
        else:
            tensors[key] = tensor.float()
    weight_map = {}
    for index in range(2):
        name = f"model-{index + 1:05d}-of-00002.safetensors"
        chunk = sorted(tensors)[index::2]
        save_file({key: tensors[key] for key in chunk}, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config.update(dtype="float32", quantization_config=QUANTIZATION_CONFIG)
    (target / "config.json").write_text(json.dumps(config))
    for extra in source.iterdir():
        if extra.name.startswith(("tokenizer", "generation_config")):
            (target / extra.name).write_bytes(extra.read_bytes())


# ---- the worker (under torchrun) ---------------------------------------------------------------


def _local_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    experts = _experts(model)[0]
    return sorted((name, tuple(p.shape)) for name, p in experts.named_parameters(recurse=False))


def _placed(model, inputs) -> dict:
    """Logits and greedy tokens of a placed model, and the shapes of its first experts' tensors on this rank."""
    return {**run_case(model, inputs), "shapes": _local_shapes(model)}


def _refusal(build, **options) -> dict:
    from hf_moe_accel import accelerate, is_accelerated

    model, _ = build()
    before = _snapshot(model)
    try:
        accelerate(model, parallel="tp", devices="cpu", **options)
        return {"refused": None}
    except ValueError as error:
        return {"refused": str(error), "unchanged": not is_accelerated(model) and _same_state(before, _snapshot(model))}


def _worker(out_dir: Path, checkpoint: Path) -> None:
    import torch.distributed as dist

    import hf_moe_accel.parallel.loading as loading
    from hf_moe_accel import accelerate, unpatch
    from hf_moe_accel.parallel.shards import loaded_shard, shard_layout
    from tests.test_shard_loading import _expert_indices, _ReadCounter

    rank, world = loading.join_process_group(timeout=60)
    counter = _ReadCounter(loading)
    results: dict[str, object] = {}

    full, inputs = fixture_case("tiny-qwen3-moe", fp8_experts=True)
    for mode in ("ep", "tp"):
        accelerate(full, parallel=mode, devices="cpu")
        results[f"fp8-experts/{mode}"] = _placed(full, inputs)
        unpatch(full)

    for mode in ("ep", "tp"):  # every rank reads its share of the checkpoint, compared with `full` cut by the rule
        counter.reset()
        model = loading.load_for_rank(checkpoint, mode, dtype=torch.float32, device="cpu")
        layout = shard_layout(full, mode, rank, world)
        mine, whole = dict(model.named_parameters()), dict(full.named_parameters())
        differ = [n for n, p in whole.items() if n not in mine or not _same(mine[n], layout.slices[n].take(p) if n in layout.slices else p)]
        shares = loaded_shard(model).slices
        record = {"differ": differ, "names_equal": mine.keys() == whole.keys(), "read": counter.bytes,
                  "reported": loading.load_report(model).bytes_read,
                  "expected": sum(p.numel() * p.element_size() for n, p in mine.items() if not (n in shares and shares[n].zeros)),
                  "experts": _expert_indices(counter.keys),
                  "scale_keys": sorted(k for k in counter.keys if k.endswith("_scale_inv"))}
        accelerate(model, parallel=mode, devices="cpu")
        results[f"loaded/{mode}"] = {**record, **_placed(model, inputs)}
        del model

    mixtral, mixtral_inputs = fixture_case("tiny-mixtral", fp8_experts=False)
    before = _snapshot(mixtral)
    for mode in ("ep", "tp"):
        accelerate(mixtral, parallel=mode, devices="cpu", expert_dtype="fp8", keep_original_experts=True)
        results[f"expert-dtype/{mode}"] = _placed(mixtral, mixtral_inputs)
        unpatch(mixtral)
        results[f"expert-dtype/{mode}"]["restored"] = _same_state(before, _snapshot(mixtral))

    small, small_inputs = random_case(KERNEL_CONFIG, torch.float16)
    for mode in ("ep", "tp"):
        accelerate(small, parallel=mode, devices="cpu")
        results[f"kernels/{mode}"] = {"logits": kernel_logits(small, small_inputs), "shapes": _local_shapes(small)}
        unpatch(small)

    results["refused/shared-block"] = _refusal(lambda: random_case(SHARED_BLOCK_CONFIG, fp8_experts=False), expert_dtype="fp8")
    results["refused/few-blocks"] = _refusal(lambda: random_case(FEW_BLOCKS_CONFIG))
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ---- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if not _have_fixtures():
        pytest.skip(f"needs the trained fixtures {', '.join(FIXTURE_NAMES)} at {FIXTURES}")
    path = tmp_path_factory.mktemp("fp8-checkpoint") / "tiny-qwen3-moe-fp8"
    write_fp8_checkpoint(FIXTURES / "tiny-qwen3-moe", path)
    return path


@pytest.fixture(scope="module")
def ranks(checkpoint, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("parallel-fp8")
    _torchrun(WORLD, [__file__, "cpu", str(out), str(checkpoint)], timeout=240, env=torchrun_env())
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The same FP8 experts accelerated in one process: the reference of every case."""
    from hf_moe_accel import accelerate

    if not _have_fixtures():
        pytest.skip(f"needs the trained fixtures {', '.join(FIXTURE_NAMES)} at {FIXTURES}")
    model, inputs = fixture_case("tiny-qwen3-moe", fp8_experts=True)
    mixtral, mixtral_inputs = fixture_case("tiny-mixtral", fp8_experts=False)
    small, small_inputs = random_case(KERNEL_CONFIG, torch.float16)
    return {"fp8-experts": run_case(accelerate(model), inputs),
            "expert-dtype": run_case(accelerate(mixtral, expert_dtype="fp8"), mixtral_inputs),
            "kernels": kernel_logits(accelerate(small), small_inputs)}


@pytest.mark.parametrize("mode", ["ep", "tp"])
@pytest.mark.parametrize("case", ["fp8-experts", "expert-dtype", "loaded"])
def test_parallel_fp8_generation_matches_one_process(ranks, one_process, case, mode):
    reference = one_process["fp8-experts" if case == "loaded" else case]
    for rank, results in enumerate(ranks):
        result = results[f"{case}/{mode}"]
        torch.testing.assert_close(result["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
        assert torch.equal(result["tokens"], reference["tokens"]), (case, mode, rank)


def test_ranks_hold_whole_experts_or_whole_scale_blocks(ranks):
    """EP: each rank's experts with all their scale blocks; TP: each expert's inner columns and the scale
    blocks over them (inner 256 = 2 blocks of 128, one per rank)."""
    for results in ranks:
        ep, tp = dict(results["fp8-experts/ep"]["shapes"]), dict(results["fp8-experts/tp"]["shapes"])
        assert ep["gate_up_proj"] == (8, 512, 256) and ep["gate_up_proj_scale_inv"] == (8, 4, 2)
        assert ep["down_proj"] == (8, 256, 256) and ep["down_proj_scale_inv"] == (8, 2, 2)
        assert tp["gate_up_proj"] == (16, 256, 256) and tp["gate_up_proj_scale_inv"] == (16, 2, 2)
        assert tp["down_proj"] == (16, 256, 128) and tp["down_proj_scale_inv"] == (16, 2, 1)
        mixtral_tp = dict(results["expert-dtype/tp"]["shapes"])  # inner 512 = 4 blocks, 2 per rank
        assert mixtral_tp["down_proj"] == (8, 256, 256) and mixtral_tp["down_proj_scale_inv"] == (8, 2, 2)
        for mode in ("ep", "tp"):
            assert results[f"expert-dtype/{mode}"]["restored"], "unpatch didn't give the original experts back bitwise"


def test_tensor_parallel_splits_whole_blocks_unevenly_through_the_kernels(ranks, one_process):
    """Inner 96 in blocks of 32: 3 blocks over 2 ranks, 2 + 1 (the first ranks take the remainder), float16
    through the Triton kernels on each rank's shard."""
    assert dict(ranks[0]["kernels/tp"]["shapes"])["down_proj"] == (6, 64, 64)
    assert dict(ranks[1]["kernels/tp"]["shapes"])["down_proj"] == (6, 64, 32)
    assert dict(ranks[1]["kernels/tp"]["shapes"])["down_proj_scale_inv"] == (6, 2, 1)
    for results in ranks:
        for mode in ("ep", "tp"):
            torch.testing.assert_close(results[f"kernels/{mode}"]["logits"], one_process["kernels"], rtol=1e-2, atol=1e-2)


def test_each_rank_reads_only_its_share_of_weights_and_scales(ranks):
    for rank, results in enumerate(ranks):
        for mode in ("ep", "tp"):
            record = results[f"loaded/{mode}"]
            assert record["names_equal"] and record["differ"] == [], (rank, mode, record["differ"][:5])
            assert record["read"] == record["reported"] == record["expected"], (rank, mode, record)
        ep, tp = results["loaded/ep"], results["loaded/tp"]
        mine = set(range(8 * rank, 8 * rank + 8))  # 16 experts over 2 ranks
        assert ep["experts"] == {layer: mine for layer in range(4)}
        assert {int(re.search(r"experts\.(\d+)\.", k)[1]) for k in ep["scale_keys"]} == mine
        assert tp["experts"] == {layer: set(range(16)) for layer in range(4)}  # every expert, half of each


def test_a_misaligned_tensor_parallel_split_is_refused_before_anything_changes(ranks):
    for results in ranks:
        shared = results["refused/shared-block"]
        assert shared["refused"] and shared["unchanged"]
        assert "inner size 72 isn't a multiple of the 128-" in shared["refused"], shared["refused"]
        assert "use parallel='ep'" in shared["refused"]
        few = results["refused/few-blocks"]
        assert few["refused"] and few["unchanged"]
        assert "inner size 128 is 1 block" in few["refused"] and "fewer than" in few["refused"], few["refused"]
        assert "use parallel='ep'" in few["refused"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU Transformers loads the experts in FP8: see the GPU test")
def test_transformers_reads_the_checkpoint_as_written(checkpoint):
    """The checkpoint format is Transformers' own: its loader (dequantizing, without a GPU) gives the
    dequantized weights of the FP8 experts the tests compare with."""
    from transformers import AutoModelForCausalLM

    from hf_moe_accel.kernels.experts_fp8_reference import dequantize_blocks

    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ours, _ = fixture_case("tiny-qwen3-moe", fp8_experts=True)
    for mine, their in zip(_experts(ours), _experts(theirs)):
        for proj in ("gate_up_proj", "down_proj"):
            weight, scale = getattr(mine, proj), getattr(mine, f"{proj}_scale_inv")
            assert torch.equal(dequantize_blocks(weight, scale, BLOCK, torch.float32), getattr(their, proj))


# ---- a GPU: bf16 activations, the Triton kernels reading each rank's FP8 share ------------------------


def _gpu_worker(out_dir: Path, checkpoint: Path) -> None:
    """Rank body on one shared GPU (gloo carries CUDA tensors): the fixture's FP8 experts in bf16, sharded by
    the placement's own functions, and the FP8 checkpoint loaded as each rank's share straight to the GPU and
    accelerated for its plan, against the unsharded accelerated model on the same GPU."""
    import os

    import torch.distributed as dist

    import hf_moe_accel.parallel.loading as loading
    from hf_moe_accel import accelerate
    from hf_moe_accel.parallel.distributed import (
        shard_expert_parallel,
        shard_tensor_parallel,
    )

    os.environ["LOCAL_RANK"] = "0"  # both ranks on GPU 0: accelerate() places each on cuda:LOCAL_RANK
    dist.init_process_group("gloo")
    device = torch.device("cuda", 0)
    shard = {"ep": shard_expert_parallel, "tp": shard_tensor_parallel}
    model, inputs = fixture_case("tiny-qwen3-moe", fp8_experts=True, dtype=torch.bfloat16)
    model.to(device)  # a device move only: a dtype cast would turn the float8 weights into bf16
    inputs = {k: v.to(device) for k, v in inputs.items()}
    accelerate(model, cuda_graphs=False)
    results = {"reference": {k: v.cpu() for k, v in run_case(model, inputs).items()}}
    for mode in ("ep", "tp"):
        undo = shard[mode](model, device)
        results[mode] = {k: v.cpu() for k, v in run_case(model, inputs).items()}
        undo.undo()
        loaded = loading.load_for_rank(checkpoint, mode, dtype=torch.bfloat16, device=device)
        accelerate(loaded, parallel=mode, cuda_graphs=False)
        results[f"loaded/{mode}"] = {k: v.cpu() for k, v in run_case(loaded, inputs).items()}
    if dist.get_rank() == 0:
        torch.save(results, out_dir / "gpu.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
def test_fp8_shards_on_a_gpu_match_the_unsharded_model(checkpoint, tmp_path):
    _torchrun(WORLD, [__file__, "gpu", str(tmp_path), str(checkpoint)], timeout=300, env=torchrun_env())
    results = torch.load(tmp_path / "gpu.pt")
    reference = results["reference"]
    scale = reference["logits"].float().abs().max()
    for name in ("ep", "tp", "loaded/ep", "loaded/tp"):
        sharded = results[name]
        # bf16: the ranks' partial sums round before the all-reduce adds them (test_distributed.py's bounds).
        assert (sharded["logits"].float() - reference["logits"].float()).abs().max() < 2e-2 * scale, name
        agree = (sharded["logits"].argmax(-1) == reference["logits"].argmax(-1)).float().mean()
        assert agree >= 0.85, (name, agree)


# ---- the slicing rule on meta-device models (no processes) -----------------------------------------


def _meta_fp8_model(block: tuple[int, int], attention_too: bool, **config):
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    config = AutoConfig.for_model("qwen3_moe", intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=4,
                                  num_experts_per_tok=2, **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    replace_with_fp8_linear(model, modules_to_not_convert=["lm_head"] + ([] if attention_too else KEEP_UNQUANTIZED),
                            quantization_config=FineGrainedFP8Config(weight_block_size=block))
    return model


def test_split_blocks_is_split_range_over_whole_blocks():
    from hf_moe_accel.parallel.shards import split_blocks, split_range

    assert [split_blocks(96, 32, 2, r) for r in range(2)] == [(0, 64), (64, 96)]
    assert [split_blocks(100, 32, 2, r) for r in range(2)] == [(0, 64), (64, 100)]  # the partial block last
    assert all(split_blocks(90, 1, 4, r) == split_range(90, 4, r) for r in range(4))


def test_fp8_attention_scales_follow_their_heads():
    """Transformers' FP8Linear q/k/v/o under tensor parallel: their block scales are cut with their rows
    (q, k, v) or columns (o), block for block; heads narrower than a block are refused."""
    from hf_moe_accel.parallel.shards import TensorSlice, shard_layout

    model = _meta_fp8_model((16, 16), attention_too=True, hidden_size=64, moe_intermediate_size=64)
    layout = shard_layout(model, "tp", 1, 2)
    attention = "model.layers.0.self_attn"
    assert layout.slices[f"{attention}.q_proj.weight_scale_inv"] == TensorSlice(0, ((2, 4),))  # heads 2-3 of 16 rows
    assert layout.slices[f"{attention}.k_proj.weight_scale_inv"] == TensorSlice(0, ((1, 2),))
    assert layout.slices[f"{attention}.o_proj.weight_scale_inv"] == TensorSlice(1, ((2, 4),))
    experts = "model.layers.0.mlp.experts"
    assert layout.slices[f"{experts}.gate_up_proj_scale_inv"] == TensorSlice(1, ((2, 4), (6, 8)))  # gate, then up blocks
    assert layout.slices[f"{experts}.down_proj_scale_inv"] == TensorSlice(2, ((2, 4),))
    narrow = _meta_fp8_model((32, 32), attention_too=True, hidden_size=64, moe_intermediate_size=64)
    with pytest.raises(ValueError, match="k_proj.weight at 16 of 32 .* inside a 32-wide FP8 scale block.*parallel='ep'"):
        shard_layout(narrow, "tp", 0, 2)


def test_expert_dtype_blocks_are_checked_before_quantizing():
    """`quantize_block` cuts plain experts as `expert_dtype` will quantize them, listing no scales yet."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_moe_accel.parallel.shards import shard_layout

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=384,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  vocab_size=128, num_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plain = shard_layout(model, "tp", 0, 2)
    planned = shard_layout(model, "tp", 0, 2, quantize_block=BLOCK)
    assert plain.expert_ranges["model.layers.0.mlp.experts"] == (0, 192)
    assert planned.expert_ranges["model.layers.0.mlp.experts"] == (0, 256)  # 3 blocks of 128: 2 + 1
    assert not any(name.endswith("_scale_inv") for name in planned.slices)


if __name__ == "__main__":
    {"cpu": _worker, "gpu": _gpu_worker}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
