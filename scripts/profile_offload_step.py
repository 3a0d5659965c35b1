"""Where an offloaded decode step's time goes: host work per MoE layer, GPU kernels, copies, CPU experts.

    python scripts/profile_offload_step.py --out OUT                     # qwen3-30b-a3b shape, 8 layers
    python scripts/profile_offload_step.py --out OUT --cached 1.0        # every expert in a slot: the round trip alone

Builds the preset with `--layers` decoder layers in host memory (random weights), accelerates it with
a GPU budget that caches `--cached` of the experts (slots set explicitly, so even 1.0 offloads),
warms up, then profiles `--steps` decode steps of one generate() call (sampled tokens, seeded: random
weights' greedy text repeats one token, whose experts stay cached): the step time against the
same layers fully on the GPU (eager, the offload path's baseline), the offload counters, the host
functions by own time (cProfile) and the kernels and copies (torch.profiler; a Chrome trace goes to
OUT/offload_trace.json). Writes OUT/profile_offload_step.json. The run time grows with `--layers` and
`--steps`. Without CUDA the CPU stands in for the GPU (a smoke test: `--preset tiny-qwen3-moe`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import torch

from hf_moe_accel import (
    OffloadOptions,
    accelerate,
    offload_stats,
    reset_offload_stats,
    unpatch,
)
from hf_moe_accel.bench.offload import build_preset_on_host
from hf_moe_accel.bench.timing import forced_greedy, sampling_kwargs, timed_generate
from hf_moe_accel.offload.engine import offload_budget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_ms(model, ids: torch.Tensor, new_tokens: int) -> float:
    """ms per decode step (from the first logits on) of a sampled generate(), best of two after a warm-up."""
    timed_generate(model, ids, new_tokens, sample_seed=0)
    return 1e3 * min(timed_generate(model, ids, new_tokens, sample_seed=0)[1] for _ in range(2)) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cached", type=float, default=0.2, help="share of each layer's experts given a slot")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed generate()")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_preset_on_host(args.preset, dtype, pin_experts=False, overrides={"num_hidden_layers": args.layers})
    config = model.config.get_text_config()
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    report: dict = {"preset": args.preset, "layers": args.layers, "batch": args.batch, "device": str(device)}

    if cuda:  # the baseline: the same layers on the GPU, eager (what offload runs when every expert hits)
        accelerate(model.to(device), cuda_graphs=False)
        report["resident_eager_step_ms"] = _step_ms(model, ids, args.steps)
        unpatch(model).to("cpu")
        torch.cuda.empty_cache()

    slots = max(1, round(args.cached * experts))
    accelerate(model, gpu_memory="70GiB" if cuda else "8GiB",
               offload=OffloadOptions(slots_per_layer=slots, device=device, kv_cache_tokens=2048, prefill_tokens=1024,
                                      zero_copy=False))  # the expert cache's step, not zero-copy decode
    report["cached_fraction"] = sum(offload_budget(model).slots) / (experts * len(offload_budget(model).slots))
    report["offload_step_ms"] = _step_ms(model, ids, args.steps)
    if "resident_eager_step_ms" in report:
        report["extra_ms_per_moe_layer"] = (report["offload_step_ms"] - report["resident_eager_step_ms"]) / args.layers
    reset_offload_stats(model)
    host = cProfile.Profile()
    host.enable()
    forced_greedy(model, ids, args.steps, **sampling_kwargs(0))
    _sync(device)
    host.disable()
    report["decode_stats"] = offload_stats(model, "decode").as_dict()["total"]
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
    report["host_by_own_time"] = text.getvalue()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        forced_greedy(model, ids, args.steps, **sampling_kwargs(0))
        _sync(device)
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / "offload_trace.json"))
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    report["ops"] = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
    unpatch(model)
    (args.out / "profile_offload_step.json").write_text(json.dumps(report, indent=2))
    print(report["ops"])
    print(report["host_by_own_time"])
    print(json.dumps({k: v for k, v in report.items() if k not in ("ops", "host_by_own_time")}, indent=2))


if __name__ == "__main__":
    main()
