"""Where a graph-decode step's time goes: the graph replay itself vs Transformers' loop around it.

    python scripts/profile_decode_step.py --preset olmoe-1b-7b --batch 1,32 --out OUT [--compile-decode]

Prints, per batch: ms per decode step inside generate() (as accelerate() runs it; with the stop
checks every step, where transformers >= 5.18 would defer them; with the 4D mask built on the host
instead of in the graph), ms per bare graph replay, the difference (what the
host loop adds: input preparation, mask, logits processors, stopping checks), the host's own time
per step (generate() with the replays made no-ops: the pace the host alone allows), the host time
of one graph launch (cudaGraphLaunch, with the GPU busy), capture time and graph memory. JSON to
OUT/profile_decode_step.json.
`--kernels`: the GPU kernels of one replay, by total time (torch.profiler), then by the time each adds
to the replay's end (`critical_path`: with PDL kernels overlap, so their own spans overstate them); `--host`: the host
functions of one generate() call, by cumulative time (cProfile); `--trace`: a Chrome trace (host and
GPU) of a 16-token generate() call, OUT/trace_b{batch}.json, to see where the GPU waits for the host.
`--decode-linear-data FILE`: the decode linears' tuned data from FILE (an A/B of two config files, each
in its own process on the same machine: compare their bare replays). `--attention`: "ours" as accelerate() sets it (patches/attention.py); "transformers" keeps
Transformers' own "sdpa"; "folded" keeps the Triton decode kernel off (grouped heads folded onto their
KV head in SDPA: accelerate()'s path where the kernel does not serve). Rows carry "pdl": whether the kernels launched with
programmatic dependent launch (kernels/pdl.py; HF_MOE_ACCEL_PDL=0 in the environment turns it off: an A/B is
two processes). `--stock-first` runs stock's generate() before ours, as the bench does (another CUDA graph
in the process can slow our step: kernels/pdl.py, scripts/replay_state_probe.py), `--reset-after-stock`
then clears what stock left.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch

from hf_moe_accel import accelerate
from hf_moe_accel.bench.ab import run_stock_first
from hf_moe_accel.costmodel.presets import build_preset
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.generate import decode_state
from hf_moe_accel.kernels import decode_linear, pdl
from hf_moe_accel.patches import attention, registry


def _generate_seconds(model, ids, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_ms(model, ids, new_tokens: int) -> float:
    """ms per decode step inside generate(): the best of 3 calls of new_tokens less the best of 3 of one token."""
    one = min(_generate_seconds(model, ids, 1) for _ in range(3))
    full = min(_generate_seconds(model, ids, new_tokens) for _ in range(3))
    return 1e3 * (full - one) / (new_tokens - 1)


def _host_loop_ms(model, runner, ids, new_tokens: int) -> float:
    """ms per decode step with every replay a no-op: the host's own time per step."""
    saved = {key: step.replay for key, step in runner._steps.items()}
    for step in runner._steps.values():
        step.replay = lambda: None
    try:
        return _step_ms(model, ids, new_tokens)
    finally:
        for key, replay in saved.items():
            runner._steps[key].replay = replay


def captured_step(model, batch: int) -> tuple:
    """(replay, its cache, the cache's write positions now) of the graph captured for `batch`."""
    runner = decode_state(model).runner
    replay = next(s for key, s in runner._steps.items() if key[-1][0][1][0] == batch).replay  # key[-1]: input signatures
    cache = next(c for c in decode_state(model).pool._caches.values() if c.layers[0].keys.shape[0] == batch)
    return replay, cache, [layer.cumulative_length.clone() for layer in cache.layers]


def median_replay_ms(replay, before_each=lambda: None) -> float:
    """Median ms of 20 calls of `replay`, timed with CUDA events; `before_each` runs outside the timed region."""
    times = []
    for _ in range(20):
        before_each()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def put_back_positions(cache, positions) -> None:
    """Undo a replay's advance of the cache's write positions (`positions`: as captured_step saw them)."""
    for layer, saved in zip(cache.layers, positions):
        layer.cumulative_length.copy_(saved - 1)


def bare_replay_ms(replay, cache, positions) -> float:
    """median_replay_ms of our step, its write positions put back between replays."""
    return median_replay_ms(replay, lambda: put_back_positions(cache, positions))


def replay_launch_us(replay, cache, positions) -> float:
    """Host µs of one replay() (cudaGraphLaunch) while the GPU is busy, so the launch itself is timed."""
    times = []
    for _ in range(10):
        torch.cuda._sleep(20_000_000)  # 20M GPU cycles (milliseconds) queued ahead of the launch
        start = time.perf_counter()
        replay()
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        put_back_positions(cache, positions)
    return 1e6 * sorted(times)[len(times) // 2]


def critical_path(kernels: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """Per kernel, named with the kernel before it (q/k/v, o_proj and the router are one kernel name):
    [launches, us it adds to the end of the chain, us of its own spans], from (name, start us, duration us)
    in launch order. A kernel adds its end minus the latest end before it."""
    table: dict[str, list[float]] = {}
    latest_end, before = (kernels[0][1] if kernels else 0.0), "(first)"  # the first kernel adds its own span
    for name, start, duration in kernels:
        added = max(0.0, start + duration - latest_end)
        latest_end = max(latest_end, start + duration)
        row = table.setdefault(f"{name[:56]} <- {before[:36]}", [0, 0.0, 0.0])
        row[0] += 1
        row[1] += added
        row[2] += duration
        before = name
    return table


def _print_critical_path(prof) -> None:
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "replay.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted(((e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "kernel"),
                     key=lambda kernel: kernel[1])
    table = critical_path(kernels)
    total = sum(row[1] for row in table.values())
    print(f"critical path of one replay: {total:.1f} us over {len(kernels)} kernels")
    print(f"{'kernel <- the kernel before it':<96} {'launches':>8} {'added us':>9} {'span us':>9}")
    for key, (launches, added, span) in sorted(table.items(), key=lambda item: -item[1][1])[:30]:
        print(f"{key:<96} {launches:>8} {added:>9.1f} {span:>9.1f}")


def _select_attention(choice: str) -> None:
    """Make accelerate() set the attention `choice` names (see the module docstring)."""
    if choice == "transformers":
        registry.apply_decode_attention = lambda model: False
    elif choice == "folded":
        attention.DECODE_KERNEL = "never"


def _use_decode_linear_data(file: Path) -> None:
    """Make the decode linears read their launch data from `file` (the experts keep the device's)."""
    if not file.is_file():
        raise SystemExit(f"--decode-linear-data: no file {file}")
    decode_linear.device_config_file = lambda device: file
    decode_linear._tuned_config.cache_clear()


def _measure(model, state, batch: int, args) -> dict:
    """One batch size's figures (see the module docstring); prints the tables asked for."""
    runner = state.runner
    ids = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
    _generate_seconds(model, ids, args.new_tokens)  # capture + warm-up
    step_ms = _step_ms(model, ids, args.new_tokens)
    variants = {}
    switches = () if args.skip_variants else (("step_ms_stop_checks_every_step", "defer_stop_checks"), ("step_ms_mask_on_host", "mask_in_graph"))
    for name, switch in switches:
        setattr(state, switch, False)
        _generate_seconds(model, ids, args.new_tokens)  # a new input layout: captured here
        variants[name] = _step_ms(model, ids, args.new_tokens)
        setattr(state, switch, True)
    replay, cache, positions = captured_step(model, batch)
    replay_ms = bare_replay_ms(replay, cache, positions)
    launch_us = replay_launch_us(replay, cache, positions)
    if args.kernels:
        put_back_positions(cache, positions)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        _print_critical_path(prof)
    if args.host:
        profiler = cProfile.Profile()
        profiler.enable()
        _generate_seconds(model, ids, 32)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            _generate_seconds(model, ids, 16)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.out) / f"trace_b{batch}.json"))
    host_ms = _host_loop_ms(model, runner, ids, args.new_tokens)
    row = {"preset": args.preset, "batch": batch, "attention": args.attention, "step_ms": step_ms, **variants, "replay_ms": replay_ms,
           "loop_overhead_ms": step_ms - replay_ms, "host_step_ms_replays_skipped": host_ms, "graph_launch_us": launch_us,
           "decode_tokens_per_s": batch / step_ms * 1e3, "pdl": pdl.pdl_enabled(ids.device),
           "stock_first": args.stock_first, "reset_after_stock": args.reset_after_stock, **graph_stats(model)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="olmoe-1b-7b")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=".")
    parser.add_argument("--kernels", action="store_true", help="print the kernels of one replay")
    parser.add_argument("--host", action="store_true", help="print the host profile of one generate() call")
    parser.add_argument("--trace", action="store_true", help="write a Chrome trace of one generate() call")
    parser.add_argument("--compile-decode", action="store_true", help="profile accelerate(model, compile_decode=True)")
    parser.add_argument("--skip-variants", action="store_true", help="skip the stop-check and host-mask variants")
    parser.add_argument("--attention", choices=("ours", "transformers", "folded"), default="ours")
    parser.add_argument("--stock-first", action="store_true",
                        help="run stock generate() first (default, then static-cache compiled), as the bench does")
    parser.add_argument("--reset-after-stock", action="store_true",
                        help="with --stock-first: then reset dynamo, collect garbage, empty the allocator's cache")
    parser.add_argument("--decode-linear-data", type=Path, default=None,
                        help="take the decode linears' launch data from this config file (e.g. another git revision "
                             "of the device's file) instead of the device's: A/B of tuned data on one machine")
    args = parser.parse_args()
    if args.reset_after_stock and not args.stock_first:
        parser.error("--reset-after-stock resets what --stock-first's stock runs left: give both, or neither")
    _select_attention(args.attention)
    if args.decode_linear_data is not None:
        _use_decode_linear_data(args.decode_linear_data)
    model = build_preset(args.preset, "cuda", torch.bfloat16)
    if args.stock_first:  # the bench's process state (see scripts/decode_timeline.py)
        batch = int(args.batch.split(",")[0])
        ids = torch.randint(1, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
        run_stock_first(model, ids, args.new_tokens, reset=args.reset_after_stock)
    model = accelerate(model, compile_decode=args.compile_decode)
    state = decode_state(model)
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        rows.append(_measure(model, state, batch, args))
        print(json.dumps(rows[-1]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_decode_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
