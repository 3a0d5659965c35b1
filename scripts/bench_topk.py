"""Decode speed with fewer activated experts, on a random-weight preset (GPU).

    python scripts/bench_topk.py --out results/topk            # qwen3-30b-a3b, batch 32 and 128

For each batch and each setting (static top-k 8, 6, 4; the model's own top-k with each expert
threshold): `accelerate(model, top_k=..., expert_threshold=...)` with CUDA-graph decode, the
decode tokens/s of greedy `generate()` (prompt 128, 128 new tokens forced; the bench's own timing,
`hf_moe_accel.bench.timing.time_generate`: warm-up excluded, median of --repeats), and the experts
per token measured on the prompt batch (random weights route near-uniformly, so a threshold drops
a different share of experts here than on a trained model: compare settings at equal experts per
token, taking quality from `hf-moe-accel eval` on the trained fixtures). Writes
OUT/bench_topk.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_moe_accel.bench.quality import ExpertCounter, Setting, applied, sweep_settings
from hf_moe_accel.bench.timing import time_generate
from hf_moe_accel.costmodel.presets import PRESETS, build_preset


def _numbers(kind: type):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def measure(model, setting: Setting, prompts: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    with applied(model, setting):
        with torch.no_grad(), ExpertCounter().installed(model) as counter:
            model(prompts, logits_to_keep=1)  # eager, over the prompts: experts per token under this setting
        timing = time_generate(model, prompts, new_tokens, repeats)
    return {
        "setting": setting.name,
        "top_k": setting.top_k,
        "expert_threshold": setting.expert_threshold,
        "experts_per_token": counter.per_token,
        **timing.as_dict(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_topk.json")
    parser.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=_numbers(int), default=[32, 128])
    parser.add_argument("--top-k", type=_numbers(int), default=[8, 6, 4])
    # From a light to a heavy cut of the random-weight preset's experts, by the router logits' spread
    # (the experts/token column shows the share kept); the quality at a share: `hf-moe-accel eval`.
    parser.add_argument("--threshold", type=_numbers(float), default=[0.075, 0.08, 0.1])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke test of this script (e.g. --preset tiny-qwen3-moe), not a measurement")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_topk.py measures GPU decode speed: no CUDA device here", file=sys.stderr)
        return 2

    settings = [s for s in sweep_settings(args.top_k, args.threshold) if s.accelerated and s.name != "full"]
    model = build_preset(args.preset, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    vocab = model.config.get_text_config().vocab_size
    rows = []
    for batch in args.batch:
        prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        prompts = prompts.to(args.device)
        for setting in settings:
            row = {"batch": batch, **measure(model, setting, prompts, args.new_tokens, args.repeats)}
            print(f"batch {batch:4d}  {setting.name:16s}  {row['experts_per_token']:.2f} experts/token  "
                  f"{row['decode_tokens_per_s']:.0f} tok/s", flush=True)
            rows.append(row)
    for row in rows:  # against the same batch's model-own top-k without threshold
        base = next(r for r in rows if r["batch"] == row["batch"] and r["top_k"] == max(args.top_k))
        row["speed_vs_top_k_max"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]

    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_topk.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.preset} on {result['device']}, prompt {args.prompt_len}, {args.new_tokens} new tokens\n")
    print("| batch | setting | experts/token | decode tok/s | vs top-k " + str(max(args.top_k)) + " |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['setting']} | {r['experts_per_token']:.2f} | {r['decode_tokens_per_s']:.0f} | "
              f"{r['speed_vs_top_k_max']:.2f}x |")
    print(f"wrote {args.out / 'bench_topk.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
