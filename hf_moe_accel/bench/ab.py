"""A/B runs: stock Transformers, then hf_moe_accel, then stock again, on the same weights.

As BENCH_PROTOCOL.md says: stock is measured with its default experts implementation and with
its static-cache compiled path (`cache_implementation="static"`, which generate() compiles on a
GPU), each warmed up with a full-length decode, before and after ours in the same process; the
fastest stock figure is the baseline.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..api import accelerate, unpatch
from ..graphs import graph_stats
from ..kernels.pdl import inductor_pdl_off_reason, pdl_off_reason
from .hbm import decode_step_bytes
from .plotting import pyplot
from .timing import (
    GenerateTiming,
    copy_bandwidth_bytes_per_s,
    time_generate,
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
        return time_generate(model, input_ids, workload.new_tokens, repeats, **STOCK_BASELINES[baseline]).as_dict()
    except Exception as error:  # a stock path that fails here (e.g. compile) is reported, not fatal
        logger.warning("stock %s failed at batch %d: %s", baseline, workload.batch, error)
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
    """One result dict per workload: each stock baseline (before/after ours), ours, speedup, % of HBM limit."""
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
                progress.set_postfix_str(f"batch {workload.batch}, stock {name} ({when})")
                stock[name][when] = _time_stock(model, input_ids, workload, name, repeats)
                progress.update()

        stock_pass("before")
        progress.set_postfix_str(f"batch {workload.batch}, ours")
        accelerate(model, **options)
        try:
            ours: GenerateTiming = time_generate(model, input_ids, workload.new_tokens, repeats)
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


def markdown_table(results: list[dict]) -> str:
    """Decode tokens/s per stock baseline and ours, speedup over the best, TTFT, memory, % of the HBM limit."""
    baselines = list(results[0]["stock"]["baselines"]) if results else []
    has_limit = any("hbm_limit_tokens_per_s" in r for r in results)
    compiled = any(r["accelerate_options"].get("compile_decode") for r in results)
    header = ["model", "batch", *[f"stock {b} tok/s" for b in baselines], "ours tok/s", "speedup", "ours TTFT ms",
              "ours prefill tok/s", "peak GiB stock/ours"]
    if has_limit:
        header += ["HBM limit tok/s", "ours % of limit"]
    if compiled:
        header += ["ours compile / capture s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        stock_peak, ours_peak = r["stock"].get("peak_memory_gib"), r["ours"]["peak_memory_gib"]
        cells = [
            r["model"],
            str(r["batch"]),
            *[_rate(_best(r["stock"]["baselines"][b].values())) for b in baselines],
            _rate(r["ours"]),
            (f"{r['speedup']:.2f}x" + (CPU_SPEEDUP_TAG if r.get("device") == "cpu" else "")) if r["speedup"] else "-",
            f"{1e3 * r['ours']['ttft_s']:.1f}",
            f"{r['ours']['prefill_tokens_per_s']:.0f}",
            f"{stock_peak:.1f}/{ours_peak:.1f}" if stock_peak is not None and ours_peak is not None else "-",
        ]
        if has_limit:
            cells += [f"{r['hbm_limit_tokens_per_s']:.0f}", f"{r['ours_pct_of_hbm_limit']:.0f}%"]
        if compiled:  # compile_decode: the compiling warm-up runs, then the captures (graph_stats)
            graphs = r["ours"].get("graphs") or {}
            cells.append(f"{graphs.get('compile_seconds', 0.0):.1f} / {graphs.get('capture_seconds', 0.0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("device") == "cpu" for r in results):
        lines += ["", CPU_REFERENCE_NOTE]
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Decode tokens/s per batch: each stock baseline, ours, and the HBM limit where known."""
    plt = pyplot()
    baselines = list(results[0]["stock"]["baselines"])
    series = {f"stock {b}": [_best(r["stock"]["baselines"][b].values()) for r in results] for b in baselines}
    series["hf-moe-accel"] = [r["ours"] for r in results]
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in results]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    for i, (name, values) in enumerate(series.items()):
        heights = [v["decode_tokens_per_s"] if v else 0 for v in values]
        ax.bar([x + i * width for x in range(len(results))], heights, width, label=name)
    if all("hbm_limit_tokens_per_s" in r for r in results):
        ax.scatter([x + width * (len(series) - 1) / 2 for x in range(len(results))], [r["hbm_limit_tokens_per_s"] for r in results],
                   marker="_", s=600, color="black", label="HBM limit")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(results))], labels)
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title("Decode throughput, stock Transformers vs hf-moe-accel")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
