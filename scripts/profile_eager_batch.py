"""Where an eager decode step goes at larger batches: host, GPU kernels, and the host's waits.

    python scripts/profile_eager_batch.py --out OUT [--preset qwen3-30b-a3b] [--batch 1,32,128] [--layers N]

The predictor prices an eager step as the host's time per layer plus the GPU's work; this shows what
else in an eager step grows with the batch (results: docs/BENCHMARKS.md). It runs the preset (random
weights, uniform routing as check_predictor.py measures) through `accelerate(model, cuda_graphs=False)` and, per batch: the step
time (generate() of N tokens less one token, over N - 1), and from torch.profiler traces of the same
two generate() calls (their difference over N - 1, so prefill drops out): the GPU kernel time per
step, the host calls that wait for the GPU or the allocator (synchronize, device-to-host copies,
cudaMalloc / cudaFree) per step, and the kernels and host ops that grow the most.
JSON: OUT/profile_eager_batch.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hf_moe_accel import accelerate
from hf_moe_accel.bench.routing import uniform_routing
from hf_moe_accel.costmodel.presets import PRESETS, build_preset

# Host calls that make the host wait (for the GPU, or for memory), counted per step.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cudaMemcpyAsync", "cudaMalloc", "cudaFree", "aten::_local_scalar_dense", "aten::item", "aten::nonzero")


def _sync(ids: torch.Tensor) -> None:
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)


def _generate(model, ids: torch.Tensor, new: int) -> float:
    _sync(ids)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    _sync(ids)
    return time.perf_counter() - start


def _events(model, ids: torch.Tensor, new: int) -> tuple[Counter, Counter, Counter]:
    """Per name: kernel device us, host op self us, host call counts, of one generate() of `new` tokens."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as trace:
        _generate(model, ids, new)
    kernels, host, calls = Counter(), Counter(), Counter()
    for event in trace.key_averages():
        calls[event.key] += event.count
        host[event.key] += event.self_cpu_time_total
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] += device_us
    return kernels, host, calls


def _per_step(long: Counter, short: Counter, steps: int) -> dict[str, float]:
    return {k: (long[k] - short.get(k, 0)) / steps for k in long}


def _top(values: dict[str, float], n: int = 12) -> dict[str, float]:
    return {k[:90]: round(v, 1) for k, v in sorted(values.items(), key=lambda kv: -kv[1])[:n]}


def profile_batch(model, batch: int, prompt_len: int, new: int, device: torch.device) -> dict:
    ids = torch.randint(1, 1000, (batch, prompt_len), device=device)
    _generate(model, ids, new)  # compiles the kernels for these sizes
    step_ms = 1e3 * statistics.median((_generate(model, ids, new) - _generate(model, ids, 1)) / (new - 1)
                                      for _ in range(3))
    (k_long, h_long, c_long), (k_short, h_short, c_short) = _events(model, ids, new), _events(model, ids, 1)
    steps = new - 1
    kernels = _per_step(k_long, k_short, steps)
    host = _per_step(h_long, h_short, steps)
    calls = _per_step(c_long, c_short, steps)
    return {
        "batch": batch,
        "step_ms": round(step_ms, 2),
        "gpu_kernels_ms": round(sum(kernels.values()) / 1e3, 2),
        "waits_per_step": {k: round(calls.get(k, 0.0), 1) for k in WAITS if calls.get(k, 0.0)},
        "wait_host_us_per_step": {k: round(host.get(k, 0.0), 1) for k in WAITS if host.get(k, 0.0)},
        "top_kernels_us": _top(kernels),
        "top_host_ops_us": _top(host),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    parser.add_argument("--batch", default="1,32,128")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the preset's")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (its times mean little)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    model = build_preset(args.preset, device, torch.bfloat16, overrides={"num_hidden_layers": args.layers} if args.layers else None)
    accelerate(model, cuda_graphs=False)
    rows = []
    with uniform_routing(model, seed=0):
        for batch in (int(b) for b in args.batch.split(",")):
            rows.append({"preset": args.preset, "layers": model.config.num_hidden_layers,
                         **profile_batch(model, batch, args.prompt_len, args.new_tokens, device)})
            print(json.dumps(rows[-1]), flush=True)
            (out / "profile_eager_batch.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
