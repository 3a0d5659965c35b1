"""What in a process's state before accelerate() makes our decode replay slower?

    python scripts/replay_state_probe.py --preset qwen3-30b-a3b --first stock --out OUT

In a process where stock's generate() ran first, our decode replay can run slower than in a fresh one.
This runs one thing first (`--first`):
nothing; stock's generate() as the bench does (default, then static-cache compiled twice); one tiny
CUDA graph (an add, no Triton), kept alive or destroyed again; or an emptied allocator cache. Then
accelerate() and three generate() calls, our step's bare replay and host launch time; the replay again
with a tiny graph alive beside ours, and once that is destroyed; then the step captured again in the
same process (the runner's graphs cleared: same compiled code, a new graph and pool), the new graph's
replay and the first graph's replayed again. Last, a chain of 256 fused-RMSNorm launches captured
with PDL on and off shows whether PDL still overlaps launches in that state. JSON to OUT/replay_state_<first>.json;
results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from unittest import mock

import torch
from profile_decode_step import (
    bare_replay_ms,
    captured_step,
    median_replay_ms,
    replay_launch_us,
)

from hf_moe_accel import accelerate
from hf_moe_accel.bench.ab import run_stock_first
from hf_moe_accel.bench.timing import timed_generate
from hf_moe_accel.costmodel.presets import build_preset
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import decode_state
from hf_moe_accel.kernels import pdl
from hf_moe_accel.kernels.rmsnorm import rmsnorm_triton

CHAIN_LAUNCHES = 256


def capture_chain(hidden: int, with_pdl: bool) -> torch.cuda.CUDAGraph:
    """A graph of CHAIN_LAUNCHES fused-RMSNorm launches, each reading the one before's output."""
    with mock.patch.dict(os.environ, {pdl.ENV_SWITCH: "1" if with_pdl else "0"}):
        x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
        weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
        rmsnorm_triton(x, weight, 1e-6)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x
            for _ in range(CHAIN_LAUNCHES):
                y = rmsnorm_triton(y, weight, 1e-6)
        graph.keep_alive = (x, weight, y)  # the graph's inputs and output live as long as it does
        return graph


def chain_figures(hidden: int) -> dict:
    """ms of a fresh RMSNorm chain's replay, PDL on and off."""
    return {f"chain_pdl_{name}_ms": median_replay_ms(capture_chain(hidden, with_pdl).replay)
            for name, with_pdl in (("on", True), ("off", False))}


def tiny_graph() -> torch.cuda.CUDAGraph:
    """One captured add, replayed once: a CUDA graph with no Triton kernel in it."""
    x = torch.zeros(16, device="cuda")
    x.add_(1)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def run_first(what: str, model, ids: torch.Tensor, new_tokens: int) -> object:
    """Do `what` before accelerate(); returns anything that must stay alive."""
    if what == "stock":
        run_stock_first(model, ids, new_tokens)
    elif what == "graph":
        return tiny_graph()
    elif what == "graph-freed":
        tiny_graph()  # destroyed on return
        gc.collect()
    elif what == "empty-cache":
        torch.cuda.empty_cache()
    return None


def replay_figures(model, batch: int, prefix: str) -> tuple[dict, tuple]:
    """Our step's bare replay ms and host launch µs, under `prefix`; and the step, to replay it later."""
    replay, cache, positions = captured_step(model, batch)
    row = {f"{prefix}_replay_ms": bare_replay_ms(replay, cache, positions),
           f"{prefix}_launch_us": replay_launch_us(replay, cache, positions)}
    return row, (replay, cache, positions)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--first", choices=("nothing", "stock", "graph", "graph-freed", "empty-cache"), default="nothing")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    model = build_preset(args.preset, "cuda", torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt_len), device="cuda")
    keep = run_first(args.first, model, ids, args.new_tokens)
    model = accelerate(model, compile_decode=True)
    for _ in range(3):  # compile and capture, then warm
        timed_generate(model, ids, args.new_tokens)
    row = {"preset": args.preset, "first": args.first}
    figures, first_step = replay_figures(model, 1, "first_capture")
    row.update(figures)
    other = tiny_graph()  # a second graph alive beside ours, then destroyed again
    row["first_capture_beside_tiny_graph_replay_ms"] = bare_replay_ms(*first_step)
    del other
    gc.collect()
    row["first_capture_tiny_graph_freed_replay_ms"] = bare_replay_ms(*first_step)
    decode_state(model).runner.clear()
    for _ in range(3):  # captured again: the compiled code is reused
        timed_generate(model, ids, args.new_tokens)
    row.update(replay_figures(model, 1, "second_capture")[0])
    row["first_capture_again_replay_ms"] = bare_replay_ms(*first_step)
    row.update(chain_figures(model.config.hidden_size))
    row.update(graph_stats(model))
    del keep
    print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"replay_state_{args.first}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
