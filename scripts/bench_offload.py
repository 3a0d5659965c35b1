"""Expert offload on a GPU: a model larger than the budget, ours against stock and fetch-every-miss,
and a sweep of cache size against hit rate and decode tokens/s. Writes offload.json and
offload_sweep.png to --out (the JSON after each part, so a cut-off run keeps what it measured).

    python scripts/bench_offload.py --out results/offload

The parts, in order: the fixtures' sweep; the --preset shape built once with random weights in
pageable host memory (as from_pretrained(device_map="cpu") leaves it); the main part (ours and
fetch-every-miss at each --batch, stock with an offloading device map at --stock-batches); the preset
sweep. Each row is saved to offload.json and printed as it is measured, and offload.json's timings_s
holds each part's seconds. To run in parts: `--skip sweep --batch 1,8` first, then
`--skip fixtures,main` (the sweep over 8/16/32/64 slots per layer at batch 1) and
`--skip fixtures,sweep --batch 32 --stock-batches ''`.
Targets (issue 4): qwen3 16GiB batch 1 >= 6 tok/s and >= 1.5x fetch-every-miss.

The random-weight preset routes nearly every decode step to the same experts (see
hf_moe_accel.bench.routing): `--routing uniform` draws each token's experts uniformly instead, for the
preset parts, every system alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_accel import (
    OffloadOptions,
    accelerate,
    offload_stats,
    reset_offload_stats,
    unpatch,
)
from hf_moe_accel.bench.ab import BenchWorkload
from hf_moe_accel.bench.offload import (
    build_preset_on_host,
    markdown_table,
    run_offload_bench,
)
from hf_moe_accel.bench.plotting import pyplot
from hf_moe_accel.bench.routing import uniform_routing
from hf_moe_accel.bench.timing import timed_generate
from hf_moe_accel.offload.engine import offload_budget
from hf_moe_accel.offload.miss_cost import MissCostModel

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for offload.json and offload_sweep.png")
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--gpu-memory", default="16GiB")
    parser.add_argument("--batch", type=_ints, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stock-batches", type=_ints, default=[1], help="batches stock device_map runs at (slow)")
    parser.add_argument("--sweep-slots", type=_ints, default=[8, 16, 32, 64], help="slots per layer for the preset sweep")
    parser.add_argument("--sweep-gpu-memory", default="70GiB", help="budget the sweep's slot counts must fit in")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fixtures, main, sweep")
    parser.add_argument("--policies", default="lfu", help="eviction policies for the fixture sweep (lfu,lru,routing)")
    parser.add_argument("--simulate", action="store_true",
                        help="fixture sweep on the CPU stand-in with zero miss costs (deterministic hit rates, no speed)")
    parser.add_argument("--prefetch-experts", type=int, help="prefetch limit per layer for the fixture sweep (0: off)")
    parser.add_argument("--no-zero-copy", action="store_true",
                        help="main part and preset sweep: ours without zero-copy decode (OffloadOptions(zero_copy=False): "
                             "the expert cache's host round trip every decode step, eagerly)")
    parser.add_argument("--zero-copy-refill-every", type=int, default=0,
                        help="main part and preset sweep: OffloadOptions.zero_copy_refill_every (experimental; 0: off)")
    parser.add_argument("--with-round-trip", action="store_true",
                        help="main part: also ours with zero-copy decode off, in the same run")
    parser.add_argument("--zero-copy-max-tokens", type=int, default=OffloadOptions.zero_copy_max_tokens,
                        help="main part and preset sweep: OffloadOptions.zero_copy_max_tokens, the largest decode batch "
                             "zero-copy serves (larger ones run the expert cache eagerly)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--routing", default="model", choices=["model", "uniform"],
                        help="the preset parts' routing: the random-weight model's own (nearly the same experts every "
                             "decode step), or uniform draws per token (hf_moe_accel.bench.routing; the fixtures keep theirs)")
    return parser.parse_args()


def _zero_copy(args: argparse.Namespace) -> dict:
    """OffloadOptions' zero-copy fields for the preset parts."""
    # zero_copy None: OffloadOptions' default (on for CUDA, experts without biases)
    return {"zero_copy": False if args.no_zero_copy else None, "zero_copy_refill_every": args.zero_copy_refill_every,
            "zero_copy_max_tokens": args.zero_copy_max_tokens}


def _environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    for package in ("transformers", "triton", "accelerate"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return env


def _decode_point(model, input_ids: torch.Tensor, new_tokens: int, sample_seed: int | None = None) -> dict:
    """One warm-up and one timed generate() (greedy, or sampled with `sample_seed`): decode tokens/s
    and the decode hit rate of the timed one."""
    timed_generate(model, input_ids, new_tokens, sample_seed=sample_seed)
    reset_offload_stats(model)
    _, decode_s = timed_generate(model, input_ids, new_tokens, sample_seed=sample_seed)
    decode = offload_stats(model, "decode").total
    plan = offload_budget(model)
    return {
        "slots_per_layer": min(plan.slots),
        "cached_fraction": sum(plan.slots) / sum(plan.num_experts),
        "hit_rate": decode.hit_rate,
        "decode_tokens_per_s": input_ids.shape[0] * (new_tokens - 1) / decode_s,
        "pcie_bytes_per_token": decode.pcie_bytes / (input_ids.shape[0] * (new_tokens - 1)),
    }


def fixture_sweep(path: Path, dtype: torch.dtype, device: torch.device, policies: list[str], simulate: bool,
                  prefetch_experts: int | None) -> list[dict]:
    """Real routing: a held-out prompt of 128 tokens, 64 new tokens, batch 1, at several cache sizes,
    for each eviction policy."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer((path / "heldout.txt").read_text()[:4000], return_tensors="pt").input_ids[:, :128]
    prompt = prompt.to("cpu" if simulate else device)
    experts = model.config.get_text_config().num_local_experts
    # --simulate: the CPU stand-in with zero miss costs: every miss fetched, prefetch never throttled
    # by time, so the hit rates depend on the routing and the policy only.
    fixed = {"device": "cpu", "cost_model": MissCostModel(0.0, 0.0, 0.0)} if simulate else {}
    fixed["prefetch_experts"] = prefetch_experts
    points = []
    for policy in policies:
        for slots in sorted({1, 2, experts // 4, experts // 2, 3 * experts // 4, experts}):
            # zero-copy off: decode then runs the cache, whose eviction policies this sweep compares
            accelerate(model, gpu_memory="8GiB",
                       offload=OffloadOptions(slots_per_layer=slots, eviction=policy, zero_copy=False, **fixed))
            label = policy if prefetch_experts is None else f"{policy}, prefetch {prefetch_experts}"
            points.append({"model": f"{path.name} ({label})", **_decode_point(model, prompt, 64)})
            unpatch(model)
    return points


def preset_sweep(model, name: str, slots: list[int], gpu_memory: str, args, device: torch.device) -> list[dict]:
    input_ids = torch.randint(1, model.config.get_text_config().vocab_size, (1, args.prompt_len),
                              generator=torch.Generator().manual_seed(0)).to(device)
    points = []
    for count in slots:
        accelerate(model, gpu_memory=gpu_memory, offload=OffloadOptions(slots_per_layer=count, **_zero_copy(args)))
        label = f"{name} (random weights{', uniform routing' if args.routing == 'uniform' else ''}{', no zero-copy' if args.no_zero_copy else ''})"
        points.append({"model": label, **_decode_point(model, input_ids, 16, sample_seed=0)})
        unpatch(model)
    return points


def plot(sweeps: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (hits, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in dict.fromkeys(p["model"] for p in sweeps):
        points = sorted((p for p in sweeps if p["model"] == model), key=lambda p: p["cached_fraction"])
        x = [100 * p["cached_fraction"] for p in points]
        hits.plot(x, [100 * p["hit_rate"] for p in points], marker="o", label=model)
        speed.plot(x, [p["decode_tokens_per_s"] for p in points], marker="o", label=model)
    hits.set(xlabel="experts cached on the GPU (%)", ylabel="decode hit rate (%)", title="Expert cache hit rate")
    speed.set(xlabel="experts cached on the GPU (%)", ylabel="decode tokens/s (batch 1)", yscale="log",
              title="Decode speed")
    for ax in (hits, speed):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(args.skip.split(","))
    results: dict = {"environment": _environment(), "args": {k: str(v) for k, v in vars(args).items()}, "timings_s": {}}

    def save() -> None:
        (args.out / "offload.json").write_text(json.dumps(results, indent=2))

    sweeps: list[dict] = []
    if "fixtures" not in skip:
        start = time.perf_counter()
        for name in ("tiny-qwen3-moe", "tiny-mixtral"):
            if (args.fixtures / name).is_dir():
                sweeps += fixture_sweep(args.fixtures / name, dtype, device, args.policies.split(","), args.simulate,
                                        args.prefetch_experts)
        results["fixture_sweep"] = sweeps[:]
        results["timings_s"]["fixture_sweep"] = time.perf_counter() - start
        save()

    def preset_routing():
        return uniform_routing(model) if args.routing == "uniform" else contextlib.nullcontext()

    if {"main", "sweep"} - skip:
        start = time.perf_counter()
        # pageable, as from_pretrained(device_map="cpu") leaves it: stock runs on that, accelerate() pins
        model = build_preset_on_host(args.preset, dtype, pin_experts=False)
        results["timings_s"]["build"] = time.perf_counter() - start

    if "main" not in skip:
        start = time.perf_counter()
        workloads = [BenchWorkload(b, args.prompt_len, args.new_tokens) for b in args.batch]
        results["rows"] = []

        def keep(row: dict) -> None:  # saved as measured: a run cut off keeps its rows
            results["rows"].append(row)
            save()
            print(f"{row['system']} batch {row['batch']}: {row['decode_tokens_per_s'] or 0:.2f} decode tok/s", flush=True)

        with preset_routing():
            rows = run_offload_bench(model, args.preset, args.gpu_memory, workloads, repeats=args.repeats,
                                     stock_batches=args.stock_batches, options=OffloadOptions(**_zero_copy(args)),
                                     on_row=keep, round_trip_row=args.with_round_trip)
        results["rows"] = rows
        results["timings_s"]["main"] = time.perf_counter() - start
        ours_1 = next((r for r in rows if r["system"] == "ours" and r["batch"] == 1), None)
        if ours_1 is not None:
            results["targets"] = {
                "batch1_tokens_per_s>=6": ours_1["decode_tokens_per_s"] >= 6,
                "batch1_vs_fetch_every_miss>=1.5": ours_1["speedup_vs_fetch"] >= 1.5,
                "peak_within_budget": ours_1["within_budget"],
            }
        print(markdown_table(rows))
        save()

    if "sweep" not in skip:
        start = time.perf_counter()
        with preset_routing():
            preset_points = preset_sweep(model, args.preset, args.sweep_slots, args.sweep_gpu_memory, args, device)
        sweeps += preset_points
        results["preset_sweep"] = preset_points
        results["timings_s"]["preset_sweep"] = time.perf_counter() - start
        save()

    if sweeps:
        plot(sweeps, args.out / "offload_sweep.png")
    print(json.dumps({"targets": results.get("targets"), "timings_s": results["timings_s"]}, indent=2))


if __name__ == "__main__":
    main()
