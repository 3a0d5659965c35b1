"""examples/ as a user runs them: each script in a subprocess on CPU, its exit code and what it prints.

The trained tiny-qwen3-moe fixture is each script's model when ../shared/fixtures has it, else the
random tiny model the examples build in code ("tiny"); quickstart runs both ways. The runs start
together (up to one per core, one thread each) when the module's first test asks, since most of
each run is Python start-up; each test then checks its own run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
FIXTURE = FIXTURES / "tiny-qwen3-moe"
MODEL = str(FIXTURE) if FIXTURE.is_dir() else "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), str(EXAMPLES / script), *args]


def _script(script: str, *args: str, model: str = MODEL) -> list[str]:
    return [str(EXAMPLES / script), "--model", model, "--device", "cpu", *args]


# Case name (a test below, test_<name>) -> the python arguments of its run.
CASES = {
    **({"quickstart_fixture": _script("quickstart.py")} if MODEL != "tiny" else {}),
    "quickstart_tiny": _script("quickstart.py", model="tiny"),
    "pipeline_and_streamer": _script("pipeline_and_streamer.py"),
    "ab_against_stock": _script("ab_against_stock.py", "--new-tokens", "8", "--repeats", "2"),
    "larger_than_gpu": _script("larger_than_gpu.py"),
    "fewer_experts": _script("fewer_experts.py", "--max-tokens", "1024"),
    "several_gpus_torchrun": _torchrun("several_gpus.py", "--parallel", "ep", "--model", MODEL, "--device", "cpu"),
    "several_gpus_one_process": _script("several_gpus.py"),
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    # One thread a process: the runs share the cores. The repository on the path after whatever is
    # there, for a checkout that isn't installed.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(request):
    """Case name -> Future of its CompletedProcess; only the cases whose tests were selected run."""
    mine = [item for item in request.session.items if getattr(item.module, "__name__", None) == __name__]
    selected = {item.name.removeprefix("test_").split("[")[0] for item in mine} & CASES.keys()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, CASES[name]) for name in selected}
        yield futures
        for future in futures.values():
            future.cancel()


def output(runs: dict[str, Future], name: str) -> str:
    result = runs[name].result()
    assert result.returncode == 0, f"{' '.join(CASES[name])} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def test_quickstart_fixture(runs):
    if MODEL == "tiny":
        pytest.skip(f"the tiny-qwen3-moe fixture is not at {FIXTURE}")
    out = output(runs, "quickstart_fixture")
    assert "accelerated: True; 4 MoE blocks, 4 fused routers; families: qwen3_moe" in out
    assert out.count("generated: ") == 2
    assert "tokens equal stock: True" in out and "after unpatch, accelerated: False" in out


def test_quickstart_tiny(runs):
    out = output(runs, "quickstart_tiny")
    assert "accelerated: True; 2 MoE blocks, 2 fused routers" in out
    assert "tokens equal stock: True" in out and "after unpatch, accelerated: False" in out


def test_pipeline_and_streamer(runs):
    out = output(runs, "pipeline_and_streamer")
    assert out.count("pipeline: ") == 2 and "TextStreamer: " in out
    assert re.search(r"TextIteratorStreamer: \d+ pieces", out)
    assert "streamed text equals generate()'s: True" in out


def test_ab_against_stock(runs):
    out = output(runs, "ab_against_stock")
    stock = re.search(r"stock: +([\d.]+) tokens/s", out)
    ours = re.search(r"accelerated: +([\d.]+) tokens/s .*, ([\d.]+)x stock", out)
    assert stock and ours and float(stock[1]) > 0 and float(ours[1]) > 0, out
    assert "tokens equal stock: True" in out
    assert "plain-torch reference path" in out and "not a speed claim" in out


def test_larger_than_gpu(runs):
    out = output(runs, "larger_than_gpu")
    assert "the CPU stands in for the GPU side" in out
    assert re.search(r"gpu_memory=1GiB: \d+ of \d+ experts cached per layer, on cpu", out)
    assert "tokens equal stock: True" in out
    lookups = re.search(r"offload_stats decode: hit rate [\d.]+% \((\d+)/(\d+) expert lookups\)", out)
    assert lookups and int(lookups[2]) > 0, out


def test_fewer_experts(runs):
    out = output(runs, "fewer_experts")
    ppl = dict(re.findall(r"^ +(\S+) +perplexity +([\d.]+)", out, flags=re.MULTILINE))
    assert "full" in ppl and "threshold=0.2" in ppl and any(k.startswith("top_k=") for k in ppl), out
    if MODEL != "tiny":  # a trained model: fewer experts cost quality, and the eval command is shown
        assert float(ppl["top_k=1"]) > float(ppl["top_k=2"]) > float(ppl["full"]), ppl
        assert "python -m hf_moe_accel eval --model" in out


def test_several_gpus_torchrun(runs):
    out = output(runs, "several_gpus_torchrun")
    assert "parallel=ep over 2 process(es) on cpu" in out
    assert out.count("generated: ") == 2  # rank 0 alone prints
    assert "tokens equal stock: True" in out


def test_several_gpus_one_process(runs):
    out = output(runs, "several_gpus_one_process")
    assert "launch `torchrun --nproc-per-node 2" in out
    assert "parallel=single over 1 process(es) on cpu" in out and "tokens equal stock: True" in out


# Script -> (extra arguments, a line its output must hold) on the GPU.
GPU_RUNS = {
    "quickstart.py": ([], "after unpatch, accelerated: False"),
    "pipeline_and_streamer.py": ([], "streamed text equals generate()'s: True"),
    "ab_against_stock.py": (["--new-tokens", "32"], "x stock"),
    "larger_than_gpu.py": ([], "offload_stats decode: hit rate"),
    "fewer_experts.py": ([], "threshold=0.2   perplexity"),
    "several_gpus.py": ([], "parallel=single over 1 process(es) on cuda"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("script", GPU_RUNS)
def test_examples_run_on_a_gpu(script):
    """Each example on the GPU, bf16: tokens may differ from stock's at a near-tie, so the run and its report are checked."""
    args, expected = GPU_RUNS[script]
    result = _run([str(EXAMPLES / script), "--model", MODEL, "--device", "cuda", *args])
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert expected in result.stdout, result.stdout


@pytest.mark.gpu
def test_several_gpus_example_under_torchrun_with_nccl():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = _run(_torchrun("several_gpus.py", "--parallel", "ep", "--model", MODEL))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert "parallel=ep over 2 process(es) on cuda" in result.stdout and result.stdout.count("generated: ") == 2
