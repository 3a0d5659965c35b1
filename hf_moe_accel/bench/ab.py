"""A/B runs: stock Transformers, then hf_moe_accel, then stock again, on the same weights; and the
start-up of ours in fresh processes.

As docs/BENCHMARKS.md says: stock is measured with its default experts implementation and with
its static-cache compiled path (`cache_implementation="static"`, which generate() compiles on a
GPU), each warmed up with a full-length decode, before and after ours in the same process; the
fastest stock figure is the baseline, for decode and for time to first token apart.

Start-up (`measure_start`): per workload, two fresh processes one after the other, each timing
accelerate() and its first generate() call (`probe_start`); both run with the on-disk caches
(torch.compile's, Triton's, ours) in one new folder, so the first starts cold and the second finds
what the first wrote.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import accelerate, unpatch
from ..graphs import graph_stats
from ..kernels.pdl import inductor_pdl_off_reason, pdl_off_reason
from .hbm import decode_step_bytes
from .plotting import bar_panel, pyplot
from .timing import (
    GenerateTiming,
    copy_bandwidth_bytes_per_s,
    time_generate,
    time_start,
    timed_generate,
)

logger = logging.getLogger("hf_moe_accel")

# The fused kernels and CUDA graphs need CUDA: on the CPU ours runs the plain-torch reference path
# (same semantics), so a CPU run's speedup shows that the path runs and claims no speed. Every CPU
# figure of the bench says so beside it.
CPU_REFERENCE_NOTE = ("CPU: ours runs the plain-torch reference path (the fused kernels and CUDA graphs need CUDA); "
                      "its speedup makes no speed claim")
CPU_SPEEDUP_TAG = " (CPU reference path)"

# Stock configurations and the generate() arguments that select them.
STOCK_BASELINES: dict[str, dict] = {"default": {}, "static": {"cache_implementation": "static"}}


@dataclass(frozen=True)
class BenchWorkload:
    batch: int
    prompt_len: int
    new_tokens: int


def _prompt(model, workload: BenchWorkload, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (workload.batch, workload.prompt_len), generator=generator)
    return ids.to(device)


def _time_stock(model, input_ids, workload: BenchWorkload, baseline: str, repeats: int) -> dict:
    try:
        return time_generate(model, input_ids, workload.new_tokens, repeats, one_token_ttft=True,
                             **STOCK_BASELINES[baseline]).as_dict()
    except Exception as error:  # a stock path that fails here (e.g. compile) is reported, not fatal
        logger.warning("stock %s failed at batch %d, prompt %d: %s", baseline, workload.batch, workload.prompt_len, error)
        return {"error": f"{type(error).__name__}: {error}"}


def run_stock_first(model, input_ids: torch.Tensor, new_tokens: int, reset: bool = False) -> None:
    """Run stock's generate() once per baseline, the compiled one twice (its first call compiles), as
    `run_ab` does before ours: for scripts that measure ours in the process state the bench measures
    it in. With `reset`, then drop what that left behind: dynamo's compiled code (and its CUDA graphs),
    unreferenced objects, the allocator's cached blocks."""
    for name in ("default", "static", "static"):
        timed_generate(model, input_ids, new_tokens, **STOCK_BASELINES[name])
    if reset:
        torch._dynamo.reset()
        gc.collect()
        if input_ids.is_cuda:
            torch.cuda.empty_cache()


def _best(passes: Iterable[dict]) -> dict | None:
    ok = [p for p in passes if "error" not in p]
    return max(ok, key=lambda p: p["decode_tokens_per_s"]) if ok else None


def _fastest_first_token(passes: Iterable[dict]) -> dict | None:
    ok = [p for p in passes if "error" not in p and "ttft_s" in p]
    return min(ok, key=lambda p: p["ttft_s"]) if ok else None


def _prefill_best(stock: dict[str, dict[str, dict]]) -> dict | None:
    """Stock's shortest time to first token over every baseline and pass (and its prefill tokens/s):
    the prefill baseline, which may be another baseline or pass than decode's."""
    timed = [(p["ttft_s"], name, when, p) for name, passes in stock.items() for when, p in passes.items()
             if "error" not in p and "ttft_s" in p]
    if not timed:
        return None
    ttft, name, when, best = min(timed, key=lambda t: t[0])
    return {"baseline": name, "pass": when, "ttft_s": ttft, "prefill_tokens_per_s": best["prefill_tokens_per_s"]}


def run_ab(
    model,
    model_name: str,
    workloads: list[BenchWorkload],
    repeats: int = 3,
    baselines: tuple[str, ...] = ("default", "static"),
    stock_passes: int = 2,
    accelerate_options: dict | None = None,
    seed: int = 0,
) -> list[dict]:
    """One result dict per workload: each stock baseline (before/after ours), ours, the decode speedup
    and, against stock's shortest time to first token, ours' TTFT ratio and prefill speedup; % of the
    HBM limit on a GPU. Stock's static cache keeps the longest length a call asked for (a longer cache
    for every later call), so give workloads in ascending prompt and new-token length."""
    unknown = sorted(set(baselines) - set(STOCK_BASELINES))
    if unknown or not baselines:
        raise ValueError(f"unknown stock baseline(s) {unknown}; choose from {sorted(STOCK_BASELINES)}")
    if stock_passes not in (1, 2):
        raise ValueError(f"stock_passes must be 1 (before ours) or 2 (before and after), got {stock_passes}")
    options = accelerate_options or {}
    device = next(model.parameters()).device
    if device.type == "cuda":
        # Each batch size and each class swap is a new graph for torch.compile: keep stock's
        # compiled path compiled rather than let it fall back to eager at dynamo's default limit.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    bandwidth = copy_bandwidth_bytes_per_s(device) if device.type == "cuda" else None
    steps = len(workloads) * (len(baselines) * stock_passes + 1)
    progress = tqdm(total=steps, desc=f"A/B {model_name}", unit="run")
    results = []
    for workload in workloads:
        input_ids = _prompt(model, workload, device, seed)
        stock: dict[str, dict[str, dict]] = {name: {} for name in baselines}

        def stock_pass(when: str) -> None:
            for name in baselines:
                progress.set_postfix_str(f"batch {workload.batch}, prompt {workload.prompt_len}, stock {name} ({when})")
                stock[name][when] = _time_stock(model, input_ids, workload, name, repeats)
                progress.update()

        stock_pass("before")
        progress.set_postfix_str(f"batch {workload.batch}, prompt {workload.prompt_len}, ours")
        accelerate(model, **options)
        try:
            ours: GenerateTiming = time_generate(model, input_ids, workload.new_tokens, repeats, one_token_ttft=True)
            graphs = graph_stats(model)
        finally:
            unpatch(model)
        progress.update()
        if stock_passes == 2:
            stock_pass("after")
        results.append(_row(model, model_name, device, workload, stock, ours, graphs, options, bandwidth))
    progress.close()
    return results


def _row(model, model_name, device, workload, stock, ours, graphs, options, bandwidth) -> dict:
    per_baseline = {name: _best(passes.values()) for name, passes in stock.items()}
    best_name = max((n for n, b in per_baseline.items() if b), key=lambda n: per_baseline[n]["decode_tokens_per_s"], default=None)
    best = per_baseline[best_name] if best_name else None
    row = {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **workload.__dict__,
        "accelerate_options": options,
        # Programmatic dependent launch of our decode kernels and of compile_decode's inductor kernels.
        "pdl": {"kernels": pdl_off_reason(device) or "on", "inductor": inductor_pdl_off_reason(device) or "on"},
        "stock": {**(best or {}), "best_baseline": best_name, "baselines": stock},
        "ours": {**ours.as_dict(), "graphs": graphs},
        "speedup": ours.decode_tokens_per_s / best["decode_tokens_per_s"] if best else None,
    }
    prefill_best = _prefill_best(stock)
    row["stock"]["prefill_best"] = prefill_best
    # Ours' time to first token over stock's shortest, and ours' prefill tokens/s over stock's highest.
    row["ttft_ratio"] = ours.ttft_s / prefill_best["ttft_s"] if prefill_best else None
    row["prefill_speedup"] = ours.prefill_tokens_per_s / prefill_best["prefill_tokens_per_s"] if prefill_best else None
    if bandwidth is not None:
        context = workload.prompt_len + workload.new_tokens // 2
        limit = workload.batch * bandwidth / decode_step_bytes(model, workload.batch, context)
        row["hbm_limit_tokens_per_s"] = limit
        row["copy_bandwidth_tb_per_s"] = bandwidth / 1e12
        row["ours_pct_of_hbm_limit"] = 100 * ours.decode_tokens_per_s / limit
        if best:
            row["stock_pct_of_hbm_limit"] = 100 * best["decode_tokens_per_s"] / limit
    return row


def _rate(result: dict | None) -> str:
    return f"{result['decode_tokens_per_s']:.1f}" if result and "decode_tokens_per_s" in result else "failed"


def _ms(result: dict | None) -> str:
    return f"{1e3 * result['ttft_s']:.1f}" if result and "ttft_s" in result else "failed"


def _start_cell(probe: dict | None) -> str:
    if not probe or "error" in probe:
        return "failed"
    return f"{probe['first_token_s']:.1f} / {probe['first_generate_s']:.1f}"


def markdown_table(results: list[dict]) -> str:
    """Per workload: decode tokens/s per stock baseline and ours, speedup over the best; TTFT per stock
    baseline and ours, prefill tokens/s of stock best and ours, prefill speedup; memory, % of the HBM
    limit; with start times, cold and warm start (to the first token / to the first generate()'s end)."""
    baselines = list(results[0]["stock"]["baselines"]) if results else []
    has_limit = any("hbm_limit_tokens_per_s" in r for r in results)
    compiled = any(r["accelerate_options"].get("compile_decode") for r in results)
    started = any("start" in r for r in results)
    header = ["model", "batch", "prompt", *[f"stock {b} tok/s" for b in baselines], "ours tok/s", "speedup",
              *[f"stock {b} TTFT ms" for b in baselines], "ours TTFT ms",
              "prefill tok/s stock best / ours", "prefill speedup", "peak GiB stock/ours"]
    if has_limit:
        header += ["HBM limit tok/s", "ours % of limit"]
    if compiled:
        header += ["ours compile / capture s"]
    if started:
        header += ["cold start s (token / generate)", "warm start s (token / generate)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        stock_peak, ours_peak = r["stock"].get("peak_memory_gib"), r["ours"]["peak_memory_gib"]
        prefill_best, prefill_speedup = r["stock"].get("prefill_best"), r.get("prefill_speedup")
        on_cpu = r.get("device") == "cpu"
        cells = [
            r["model"],
            str(r["batch"]),
            str(r.get("prompt_len", "-")),
            *[_rate(_best(r["stock"]["baselines"][b].values())) for b in baselines],
            _rate(r["ours"]),
            (f"{r['speedup']:.2f}x" + (CPU_SPEEDUP_TAG if on_cpu else "")) if r["speedup"] else "-",
            *[_ms(_fastest_first_token(r["stock"]["baselines"][b].values())) for b in baselines],
            _ms(r["ours"]),
            f"{prefill_best['prefill_tokens_per_s']:.0f} / {r['ours']['prefill_tokens_per_s']:.0f}" if prefill_best
            else f"failed / {r['ours']['prefill_tokens_per_s']:.0f}",
            (f"{prefill_speedup:.2f}x" + (CPU_SPEEDUP_TAG if on_cpu else "")) if prefill_speedup else "-",
            f"{stock_peak:.1f}/{ours_peak:.1f}" if stock_peak is not None and ours_peak is not None else "-",
        ]
        if has_limit:
            cells += [f"{r['hbm_limit_tokens_per_s']:.0f}", f"{r['ours_pct_of_hbm_limit']:.0f}%"]
        if compiled:  # compile_decode: the compiling warm-up runs, then the captures (graph_stats)
            graphs = r["ours"].get("graphs") or {}
            cells.append(f"{graphs.get('compile_seconds', 0.0):.1f} / {graphs.get('capture_seconds', 0.0):.1f}")
        if started:
            start = r.get("start") or {}
            cells += [_start_cell(start.get("cold")), _start_cell(start.get("warm"))]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("device") == "cpu" for r in results):
        lines += ["", CPU_REFERENCE_NOTE]
    return "\n".join(lines)


def figure(results: list[dict]):
    """Three panels over the workloads, each stock baseline beside ours: decode tokens/s (with the
    HBM limit where known), time to first token, prefill tokens/s."""
    plt = pyplot()
    baselines = list(results[0]["stock"]["baselines"])
    labels = [f"{r['model']}\nbatch {r['batch']}, prompt {r.get('prompt_len', '-')}" for r in results]
    decode = {f"stock {b}": [_best(r["stock"]["baselines"][b].values()) for r in results] for b in baselines}
    first = {f"stock {b}": [_fastest_first_token(r["stock"]["baselines"][b].values()) for r in results] for b in baselines}
    decode["hf-moe-accel"] = first["hf-moe-accel"] = [r["ours"] for r in results]

    def values(series: dict[str, list], key: str, scale: float = 1.0) -> dict[str, list]:
        return {name: [scale * v[key] if v and key in v else None for v in row] for name, row in series.items()}

    fig, axes = plt.subplots(3, 1, figsize=(max(6, 1.8 * len(results)), 13))
    bar_panel(axes[0], labels, values(decode, "decode_tokens_per_s"), "decode tokens/s",
              "Decode throughput, stock Transformers vs hf-moe-accel")
    if all("hbm_limit_tokens_per_s" in r for r in results):
        centre = 0.8 / (len(decode)) * (len(decode) - 1) / 2
        axes[0].scatter([x + centre for x in range(len(results))], [r["hbm_limit_tokens_per_s"] for r in results],
                        marker="_", s=600, color="black", label="HBM limit")
        axes[0].legend()
    bar_panel(axes[1], labels, values(first, "ttft_s", 1e3), "time to first token, ms (lower is better)",
              "Time to first token (a generate() of one new token)")
    bar_panel(axes[2], labels, values(first, "prefill_tokens_per_s"), "prefill tokens/s",
              "Prefill throughput (batch x prompt tokens / time to first token)")
    fig.tight_layout()
    return fig


def plot(results: list[dict], path: str) -> None:
    """`figure(results)` written to `path` (PNG)."""
    fig = figure(results)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# Where the on-disk caches that a process's start-up reads live: torch.compile's (FX graph, AOT
# autograd and inductor artifacts), Triton's compiled kernels, ours, the driver's JIT cache. Every
# cache that start-up reads must be named here, or the first probe doesn't start cold.
START_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_MOE_ACCEL_CACHE", "CUDA_CACHE_PATH")
START_PASSES = ("cold", "warm")


def probe_start(model, workload: BenchWorkload, options: dict, seed: int = 0) -> dict:
    """Time accelerate(model, **options) and the first generate() of `workload` after it (`time_start`):
    the first thing to run on the model in a fresh process. The prompt is the A/B bench's."""
    device = next(model.parameters()).device
    input_ids = _prompt(model, workload, device, seed)
    timing = time_start(lambda: accelerate(model, **options), model, input_ids, workload.new_tokens)
    return {
        "accelerate_s": timing.setup_s,
        "first_token_s": timing.first_token_s,
        "first_generate_s": timing.first_generate_s,
        "accelerate_options": options,
        "pid": os.getpid(),
        "caches": {name: os.environ.get(name) for name in START_CACHE_VARIABLES},
    }


def measure_start(probe_command: Callable[[BenchWorkload, str], list[str]], workloads: list[BenchWorkload],
                  timeout_s: float | None = None, report: Callable[[str], object] | None = None) -> list[dict]:
    """Per workload, `{"cold": probe, "warm": probe}`: `probe_command(workload, out_file)` (arguments
    after `python`; the command writes `probe_start`'s dict as JSON to `out_file`) run in two fresh
    processes one after the other, with the caches of `START_CACHE_VARIABLES` in one new temporary
    folder per workload, removed afterwards. A probe that fails is reported as `{"error": ...}`.
    `report` gets one line per probe as it ends."""
    package_root = str(Path(__file__).resolve().parents[2])  # the children import this copy of the package
    results = []
    for workload in workloads:
        with tempfile.TemporaryDirectory(prefix="hf_moe_accel_start_") as folder:
            env = dict(os.environ)
            env.update({name: os.path.join(folder, name.lower()) for name in START_CACHE_VARIABLES})
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
            probes = {}
            for when in START_PASSES:
                out = os.path.join(folder, f"{when}.json")
                probes[when] = _run_probe([sys.executable, *probe_command(workload, out)], out, env, timeout_s)
                if report is not None:
                    probe = probes[when]
                    report(f"start-up, batch {workload.batch}, prompt {workload.prompt_len}, {when}: " + (
                        probe.get("error") or f"first token {probe['first_token_s']:.2f} s, "
                                              f"first generate() {probe['first_generate_s']:.2f} s"))
        results.append(probes)
    return results


def _run_probe(command: list[str], out: str, env: dict, timeout_s: float | None) -> dict:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:g} s"}
    if done.returncode != 0 or not os.path.exists(out):
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit status {done.returncode}: " + " / ".join(tail)}
    with open(out) as f:
        return json.load(f)
