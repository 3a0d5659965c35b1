"""Where a generate() call's decode time goes: a fixed part per call against a part per step.

    python scripts/decode_timeline.py --preset qwen3-30b-a3b --batch 1 --compile-decode --out OUT

The bench's decode time (bench/timing.py: from the first logits to the last token) is timed here
for several numbers of new tokens, 5 calls each; a least-squares line through the medians gives
the fixed part per call (the intercept) and the time per step (the slope). One 128-token call is
then followed on the host: when each decode step's runner call started and returned, relative to
the first logits, and when generate() returned. `--stock-first` runs stock's generate() first, as the
bench does, to see whether that slows ours (another CUDA graph in the process can: kernels/pdl.py,
scripts/replay_state_probe.py); `--reset-after-stock` then clears what stock left
(`bench.ab.run_stock_first`). JSON to OUT/decode_timeline_b{batch}[_stock_first[_reset]].json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from hf_moe_accel import accelerate
from hf_moe_accel.bench.ab import run_stock_first
from hf_moe_accel.bench.timing import timed_generate
from hf_moe_accel.costmodel.presets import build_preset
from hf_moe_accel.graphs.generate import decode_state


class _TimedRunner:
    """Stands in for the graph runner: notes the host time around each decode step it serves."""

    def __init__(self, runner):
        self.runner = runner
        self.calls: list[tuple[float, float]] = []

    def __call__(self, **kwargs):
        start = time.perf_counter()
        output = self.runner(**kwargs)
        self.calls.append((start, time.perf_counter()))
        return output

    def __getattr__(self, name: str):  # the rest (stats, ...) is the runner's
        return getattr(self.runner, name)


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def _state_suffix(args) -> str:
    if not args.stock_first:
        return ""
    return "_stock_first_reset" if args.reset_after_stock else "_stock_first"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--lengths", default="2,16,64,128", help="new tokens per call, comma-separated")
    parser.add_argument("--compile-decode", action="store_true")
    parser.add_argument("--stock-first", action="store_true",
                        help="run stock generate() first (default, then static-cache compiled), as the bench does")
    parser.add_argument("--reset-after-stock", action="store_true",
                        help="with --stock-first: then reset dynamo, collect garbage, empty the allocator's cache")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    if args.reset_after_stock and not args.stock_first:
        parser.error("--reset-after-stock resets what --stock-first's stock runs left: give both, or neither")
    lengths = [int(n) for n in args.lengths.split(",")]
    model = build_preset(args.preset, "cuda", torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    if args.stock_first:
        run_stock_first(model, ids, max(lengths), reset=args.reset_after_stock)
    model = accelerate(model, compile_decode=args.compile_decode)
    timed_generate(model, ids, max(lengths))  # capture (and compile) + warm-up

    decode_ms = {}
    for n in lengths:
        runs = [1e3 * timed_generate(model, ids, n)[1] for _ in range(5)]
        decode_ms[n] = {"median": statistics.median(runs), "min": min(runs), "runs": runs}
    intercept, slope = _line([n - 1 for n in lengths], [decode_ms[n]["median"] for n in lengths])

    state = decode_state(model)
    timed = _TimedRunner(state.runner)
    state.runner = timed
    try:
        n = max(lengths)
        torch.cuda.synchronize()
        start = time.perf_counter()
        ttft_s, decode_s = timed_generate(model, ids, n)
        end = time.perf_counter()
    finally:
        state.runner = timed.runner
    first_logits = start + ttft_s
    starts = [1e3 * (s - first_logits) for s, _ in timed.calls]
    returns = [1e3 * (r - first_logits) for _, r in timed.calls]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    row = {
        "preset": args.preset, "batch": args.batch, "compile_decode": args.compile_decode, "stock_first": args.stock_first,
        "reset_after_stock": args.reset_after_stock,
        "decode_ms_by_new_tokens": decode_ms,
        "fit_fixed_ms_per_call": intercept, "fit_ms_per_step": slope,
        "timeline_new_tokens": n, "timeline_decode_ms": 1e3 * decode_s, "runner_calls": len(timed.calls),
        "first_step_start_ms": starts[0], "first_step_return_ms": returns[0],
        "median_step_gap_ms": statistics.median(gaps), "first_gaps_ms": gaps[:4],
        "last_step_return_ms": returns[-1], "generate_return_ms": 1e3 * (end - first_logits),
    }
    print(json.dumps(row))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"decode_timeline_b{args.batch}{_state_suffix(args)}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
