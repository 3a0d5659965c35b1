"""Expert and tensor parallel over 2 and 4 gloo processes (torchrun) against one stock process.

The pytest process launches this file under torchrun in worker mode: every rank builds the same
models, places them with `accelerate(model, parallel=...)`, and rank 0 saves logits and greedy
tokens (or the refusal message). The tests compare them with stock Transformers run here, in one
process, on the same weights. Uneven splits: 6 experts over 4 ranks, 3 over 2, expert inner 90 over
4; refusals: 6 heads over 4 ranks (tp), 3 experts over 4 ranks (ep).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("HF_MOE_ACCEL_FIXTURES", REPO.parent / "shared" / "fixtures"))
PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\nclass "]
NEW_TOKENS = 8
MODES = ("ep", "tp")
# Random-weight models (seeded, so every process builds the same) with the layouts fixtures lack.
RANDOM_CONFIGS = {
    # OLMoE: q/k norms over all heads (split with an all-reduced RMSNorm); 6 experts, inner 90.
    "olmoe": dict(model_type="olmoe", hidden_size=64, intermediate_size=90, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, vocab_size=128),
    # GPT-OSS: transposed, interleaved gate/up with biases, attention sinks, sliding window.
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=90, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=2, vocab_size=128,
                    sliding_window=8),
    # 6 heads and 3 experts: splits over 2 ranks (3 experts unevenly), refused over 4.
    "qwen3_six_heads": dict(model_type="qwen3_moe", hidden_size=96, moe_intermediate_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=3,
                            num_experts_per_tok=2, vocab_size=128, decoder_sparse_step=1, mlp_only_layers=[]),
}


def _fixture_names() -> list[str]:
    return [name for name in ("tiny-qwen3-moe", "tiny-mixtral") if (FIXTURES / name).is_dir()]


def build_case(name: str):
    """(stock model in eval mode, generate() inputs) of one case; the same on every process."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in RANDOM_CONFIGS:
        kwargs = dict(RANDOM_CONFIGS[name])
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        model.set_experts_implementation("eager")  # grouped_mm needs 16-byte strides, which inner 90 lacks
        ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    tokenizer.padding_side = "left"
    return model, dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))


@torch.no_grad()
def run_case(model, inputs) -> dict:
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {"logits": logits, "tokens": tokens[:, inputs["input_ids"].shape[1] :]}


def _worker(out_dir: Path) -> None:
    """Rank body: each case under each mode; rank 0 writes the results."""
    import torch.distributed as dist

    from hf_moe_accel import accelerate, unpatch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in [*_fixture_names(), *RANDOM_CONFIGS]:
        model, inputs = build_case(name)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for mode in MODES:
            try:
                accelerate(model, parallel=mode, devices="cpu")
            except ValueError as error:
                results[f"{name}/{mode}"] = {"refused": str(error)}
                continue
            local_experts = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith("down_proj") and p.dim() == 3}
            results[f"{name}/{mode}"] = {**run_case(model, inputs), "local_shapes": sorted(local_experts)}
            unpatch(model)
        after = model.state_dict()
        results[f"{name}/restored"] = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    if rank == 0:
        torch.save(results, out_dir / f"world{world}.pt")
    dist.destroy_process_group()


def torchrun_env(**extra: str) -> dict[str, str]:
    """The environment of torchrun's workers: this checkout importable, one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _torchrun(nproc: int, args: list[str], timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(command, cwd=REPO, env=env or torchrun_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def world_results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"world{request.param}")
    _torchrun(request.param, [__file__, str(out)])
    return request.param, torch.load(out / f"world{request.param}.pt")


@pytest.fixture(scope="module")
def stock_results():
    """One stock process, the reference of every case."""
    return {name: run_case(*build_case(name)) for name in [*_fixture_names(), *RANDOM_CONFIGS]}


def _splittable(name: str, mode: str, world: int) -> bool:
    return not (name == "qwen3_six_heads" and world == 4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [*_fixture_names(), *RANDOM_CONFIGS])
def test_parallel_matches_one_stock_process(world_results, stock_results, name, mode):
    world, results = world_results
    result = results[f"{name}/{mode}"]
    if not _splittable(name, mode, world):
        pytest.skip("refused by design: see test_uneven_splits_that_cannot_work_are_refused")
    assert "refused" not in result, result.get("refused")
    stock = stock_results[name]
    torch.testing.assert_close(result["logits"], stock["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(result["tokens"], stock["tokens"])


def test_ranks_hold_their_share_and_unpatch_restores(world_results):
    world, results = world_results
    assert all(results[f"{name}/restored"] for name in [*_fixture_names(), *RANDOM_CONFIGS])
    # Rank 0's share: 6 experts over 4 ranks -> 2 (first ranks take the remainder); inner 90 over 4 -> 23.
    olmoe_ep = {s[0] for s in results["olmoe/ep"]["local_shapes"]}
    assert olmoe_ep == {2 if world == 4 else 3}
    olmoe_tp = {s[-1] for s in results["olmoe/tp"]["local_shapes"]}
    assert olmoe_tp == {23 if world == 4 else 45}
    if world == 2:
        assert {s[0] for s in results["qwen3_six_heads/ep"]["local_shapes"]} == {2}  # 3 experts: 2 + 1


def test_uneven_splits_that_cannot_work_are_refused(world_results):
    world, results = world_results
    if world != 4:
        pytest.skip("the refusals are for 4 ranks")
    assert "6 attention heads" in results["qwen3_six_heads/tp"]["refused"]
    assert "at least 4 experts" in results["qwen3_six_heads/ep"]["refused"]


@pytest.mark.parametrize("parallel, prompts", [("tp", PROMPTS[:1]), ("dp", [*PROMPTS, "    return "])])
def test_generate_command_under_torchrun_prints_one_process_text(parallel, prompts, capsys):
    from hf_moe_accel.cli import main

    if "tiny-qwen3-moe" not in _fixture_names():
        pytest.skip("needs the tiny-qwen3-moe fixture")
    args = ["generate", "--model", str(FIXTURES / "tiny-qwen3-moe"), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    assert main(args) == 0  # one process
    single = capsys.readouterr().out
    parallel_run = _torchrun(2, ["-m", "hf_moe_accel", *args, "--parallel", parallel])
    assert parallel_run.stdout == single  # rank 0 alone prints, the same text
    assert all(prompt.strip() in single for prompt in prompts)


def _gpu_worker(out_dir: Path) -> None:
    """Rank body on one shared GPU (gloo carries CUDA tensors): the fused Triton kernels on each
    rank's shard, bf16, against the unsharded accelerated model on the same GPU."""
    import torch.distributed as dist

    from hf_moe_accel import accelerate
    from hf_moe_accel.parallel.distributed import (
        shard_expert_parallel,
        shard_tensor_parallel,
    )

    dist.init_process_group("gloo")
    device = torch.device("cuda", 0)
    results = {}
    for name in _fixture_names():
        model, inputs = build_case(name)
        model.to(device, torch.bfloat16)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        accelerate(model, cuda_graphs=False)
        results[f"{name}/reference"] = {k: v.cpu() for k, v in run_case(model, inputs).items()}
        for mode, shard in (("ep", shard_expert_parallel), ("tp", shard_tensor_parallel)):
            undo = shard(model, device)
            results[f"{name}/{mode}"] = {k: v.cpu() for k, v in run_case(model, inputs).items()}
            undo.undo()
    if dist.get_rank() == 0:
        torch.save(results, out_dir / "gpu.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
def test_sharded_fused_kernels_on_a_gpu_match_the_unsharded_model(tmp_path):
    if not _fixture_names():
        pytest.skip("needs the trained fixtures")
    _torchrun(2, [__file__, str(tmp_path), "--gpu"])
    results = torch.load(tmp_path / "gpu.pt")
    for name in _fixture_names():
        reference = results[f"{name}/reference"]
        scale = reference["logits"].float().abs().max()
        for mode in MODES:
            sharded = results[f"{name}/{mode}"]
            # bf16: the ranks' partial sums round before the all-reduce adds them.
            assert (sharded["logits"].float() - reference["logits"].float()).abs().max() < 2e-2 * scale, (name, mode)
            # Two prompts (~18 positions, padding included): one flipped near-tie is 5.6%; the bound
            # above already limits how far apart a flip's logits can be.
            agree = (sharded["logits"].argmax(-1) == reference["logits"].argmax(-1)).float().mean()
            assert agree >= 0.85, (name, mode, agree)


if __name__ == "__main__":
    if "--gpu" in sys.argv:
        _gpu_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]))
