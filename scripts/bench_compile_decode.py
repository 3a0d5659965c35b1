"""Graph decode with and without `compile_decode`, on a random-weight preset (GPU).

    python scripts/bench_compile_decode.py --out results/compile_decode                  # olmoe-1b-7b, batch 1 and 8
    python scripts/bench_compile_decode.py --out results/compile_decode --preset qwen3-30b-a3b --batch 1

For each batch: `accelerate(model)` (CUDA-graph decode of the model itself), then, on the same
weights, `accelerate(model, compile_decode=True)` (the graphs capture the torch.compile'd step):
decode tokens/s of greedy `generate()` (the bench's timing, `hf_moe_accel.bench.timing.time_generate`:
warm-up excluded, median of --repeats), each as a percentage of the HBM limit (the bench's
`decode_step_bytes` over measured copy bandwidth), the compile and capture seconds, and the step at
which the two greedy texts part (None: never; bf16 rounding differs, so a near-tie may flip).
No stock runs: `hf-moe-accel bench --compile-decode` gives the protocol's A/B against stock.
Writes OUT/bench_compile_decode.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_moe_accel import accelerate, unpatch
from hf_moe_accel.bench.hbm import decode_step_bytes
from hf_moe_accel.bench.timing import (
    copy_bandwidth_bytes_per_s,
    forced_greedy,
    time_generate,
)
from hf_moe_accel.costmodel.presets import PRESETS, build_preset
from hf_moe_accel.graphs import graph_stats


def measure(model, prompts: torch.Tensor, compile_decode: bool, new_tokens: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """(timing and graph figures, the greedy tokens) of graph decode with or without compile_decode."""
    accelerate(model, compile_decode=compile_decode)
    try:
        timing = time_generate(model, prompts, new_tokens, repeats)
        tokens = forced_greedy(model, prompts, new_tokens)
        stats = graph_stats(model)
    finally:
        unpatch(model)
    keys = ("captures", "compiled_captures", "compile_seconds", "capture_seconds", "graph_memory_bytes", "failed_compiles")
    return {**timing.as_dict(), **{k: stats[k] for k in keys}}, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_compile_decode.json")
    parser.add_argument("--preset", default="olmoe-1b-7b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=lambda text: [int(v) for v in text.split(",") if v.strip()], default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_compile_decode.py measures CUDA-graph decode: no CUDA device here", file=sys.stderr)
        return 2

    model = build_preset(args.preset, "cuda", torch.bfloat16)
    device = next(model.parameters()).device
    bandwidth = copy_bandwidth_bytes_per_s(device)
    vocab = model.config.get_text_config().vocab_size
    rows = []
    for batch in args.batch:
        prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
        limit = batch * bandwidth / decode_step_bytes(model, batch, args.prompt_len + args.new_tokens // 2)
        uncompiled, plain_tokens = measure(model, prompts, False, args.new_tokens, args.repeats)
        compiled, compiled_tokens = measure(model, prompts, True, args.new_tokens, args.repeats)
        differs = (plain_tokens[:, args.prompt_len:] != compiled_tokens[:, args.prompt_len:]).any(0).nonzero()
        row = {
            "batch": batch,
            "hbm_limit_tokens_per_s": limit,
            "uncompiled": {**uncompiled, "pct_of_hbm_limit": 100 * uncompiled["decode_tokens_per_s"] / limit},
            "compiled": {**compiled, "pct_of_hbm_limit": 100 * compiled["decode_tokens_per_s"] / limit},
            "speedup": compiled["decode_tokens_per_s"] / uncompiled["decode_tokens_per_s"],
            "greedy_parts_at_step": differs[0].item() if differs.numel() else None,
        }
        rows.append(row)
        print(f"batch {batch}: {uncompiled['decode_tokens_per_s']:.0f} -> {compiled['decode_tokens_per_s']:.0f} tok/s, "
              f"compile {compiled['compile_seconds']:.1f} s", flush=True)

    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "copy_bandwidth_tb_per_s": bandwidth / 1e12,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compile_decode.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.preset} on {result['device']}, prompt {args.prompt_len}, {args.new_tokens} new tokens\n")
    print("| batch | graphs tok/s | % of limit | compiled graphs tok/s | % of limit | speedup | compile s | capture s | greedy parts at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        plain, comp = r["uncompiled"], r["compiled"]
        print(f"| {r['batch']} | {plain['decode_tokens_per_s']:.0f} | {plain['pct_of_hbm_limit']:.0f}% | "
              f"{comp['decode_tokens_per_s']:.0f} | {comp['pct_of_hbm_limit']:.0f}% | {r['speedup']:.2f}x | "
              f"{comp['compile_seconds']:.1f} | {comp['capture_seconds']:.2f} | {r['greedy_parts_at_step']} |")
    print(f"wrote {args.out / 'bench_compile_decode.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
