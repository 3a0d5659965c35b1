"""Offload benchmark: a model larger than the GPU budget, decoded three ways in one process.

- "stock device_map": Transformers with accelerate's offloading device map for the same budget
  (what `from_pretrained(..., device_map="auto", max_memory={0: budget, "cpu": ...})` builds): the
  layers that don't fit are copied to the GPU at every forward.
- "ours": `accelerate(model, gpu_memory=budget)`: expert cache; decode zero-copy in CUDA graphs
  (OffloadOptions.zero_copy, on by default on a GPU), prefill and larger batches with each miss
  on the CPU or fetched, as the cost model says.
- "ours, no zero-copy" (on request): the same engine with zero-copy off, the cache's round trip.
- "ours fetch-every-miss": the same engine with every miss fetched into a slot, zero-copy off.

One accelerate() serves every workload, its reserve sized for the largest of them (prefill tokens,
and the static cache of graph decode), so that every run keeps to the budget.

The model comes in on the CPU (loaded with `device_map="cpu"`, or built there) and leaves there.
Stock runs first, on the weights as loaded (pageable memory, as a user has them); stock moves all
offloaded weights at every step (seconds per token on real shapes), so it runs a short decode
(`stock_new_tokens`) once, after a 2-token warm-up.

Every run decodes sampled tokens, seeded (`timing.sampling_kwargs`): on random weights greedy text
repeats one token, so the same experts every step, and the cache would look perfect.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable

import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import find_tied_parameters, retie_parameters
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..api import accelerate, unpatch
from ..costmodel.memory import format_bytes, length_bucket, parse_memory_size
from ..costmodel.presets import PRESETS
from ..kernels.spec import Activation, is_experts_module
from ..offload.engine import (
    OffloadOptions,
    offload_budget,
    offload_miss_costs,
    offload_options,
    offload_stats,
    prepare_offload,
    reset_offload_stats,
    set_miss_policy,
    set_zero_copy,
)
from ..offload.expert_cache import expert_tensors
from ..offload.host_weights import PinnedArena, remove_hook_keeping_class_forward
from ..patches.experts import expert_weights
from .ab import BenchWorkload
from .plotting import pyplot
from .timing import timed_generate

logger = logging.getLogger("hf_moe_accel")


def build_preset_on_host(name: str, dtype: torch.dtype = torch.bfloat16, *, seed: int = 0, pin_experts: bool = True,
                         overrides: dict | None = None) -> nn.Module:
    """A random-weight preset (costmodel/presets.py) built on the host without a second copy, for models
    larger than the GPU: the skeleton on the meta device, then each tensor allocated once on the host
    (experts pinned, when CUDA is there and `pin_experts`) and filled: normal(0, initializer_range)
    for matrices, ones for norm weights, zeros for other vectors. The random numbers are drawn on the
    GPU when there is one (a 61 GB model fills in seconds). `overrides` sets config fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config.get_text_config(), "initializer_range", 0.02))
    experts = {id(t) for m in model.modules() if is_experts_module(m)
               for t in expert_tensors(expert_weights(m, Activation()))}
    arena = PinnedArena(2**32) if cuda and pin_experts else None
    tied = find_tied_parameters(model)
    for module_name, module in tqdm(list(model.named_modules()), desc=f"building {name} on the host", unit="module"):
        for param_name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            pinned = arena is not None and id(param) in experts
            host = arena.empty(param.shape, param.dtype) if pinned else torch.empty(param.shape, dtype=param.dtype)
            if param.dim() >= 2:
                flat = host.view(-1)
                for start in range(0, flat.numel(), 1 << 26):  # 64M numbers at a time
                    part = torch.randn(min(1 << 26, flat.numel() - start), generator=generator, device=device)
                    flat[start : start + part.numel()].copy_(part.mul_(std).to(param.dtype))  # cast where drawn
            else:
                host.fill_(1.0 if "norm" in f"{module_name}.{param_name}".lower() else 0.0)
            module._parameters[param_name] = nn.Parameter(host, requires_grad=param.requires_grad)
    retie_parameters(model, tied)
    return model.eval()


def _prompt(model: nn.Module, workload: BenchWorkload, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(1, vocab, (workload.batch, workload.prompt_len), generator=generator).to(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed_runs(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, repeats: int, offloaded: bool, seed: int,
                warmup_tokens: int | None = None) -> dict:
    """A warm-up generate() (`warmup_tokens`, default as long as the timed ones), then `repeats` timed
    ones (medians), all sampled with `seed`; offload counters over the timed runs."""
    batch, prompt_len = input_ids.shape
    timed_generate(model, input_ids, warmup_tokens or new_tokens, sample_seed=seed)
    if offloaded:
        reset_offload_stats(model)
    runs = [timed_generate(model, input_ids, new_tokens, sample_seed=seed) for _ in range(repeats)]
    ttft, decode_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    row = {
        "ttft_s": ttft,
        "prefill_tokens_per_s": batch * prompt_len / ttft,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
    }
    if offloaded:
        decode = offload_stats(model, "decode").total
        tokens = repeats * batch * (new_tokens - 1)
        row |= {
            "hit_rate": decode.hit_rate,
            "pcie_bytes_per_token": decode.pcie_bytes / tokens,
            "fetched_per_token": decode.fetched / tokens,
            "cpu_experts_per_token": decode.cpu_experts / tokens,
            "prefetched_per_token": decode.prefetched / tokens,
            "prefetch_accuracy": decode.prefetch_accuracy,
            "cpu_expert_s_per_token": decode.cpu_expert_s / tokens,
            "prefill_hit_rate": offload_stats(model, "prefill").total.hit_rate,
            "decode_stats": offload_stats(model, "decode").as_dict(),  # per layer and overall
        }
    return row


def _offloaded_bytes(model: nn.Module, device_map: dict) -> int:
    """Bytes of the modules a device map puts on the CPU or disk: what stock copies in at every forward."""
    total = 0
    for name, where in device_map.items():
        if where in ("cpu", "disk"):
            module = model.get_submodule(name) if name else model
            total += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return total


def _dispatch_stock(model: nn.Module, budget: int, device: torch.device) -> dict:
    """accelerate's offloading dispatch for `budget` on `device` (the rest on the CPU); the device map."""
    host = 2 * sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(model, max_memory={device.index: budget, "cpu": host},
                                       no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map, main_device=device)
    return device_map


def _undispatch_stock(model: nn.Module) -> None:
    for module in model.modules():  # offloaded tensors come back from the hooks' weights maps
        remove_hook_keeping_class_forward(module)
    model.__dict__.pop("hf_device_map", None)
    model.to("cpu")
    torch.cuda.empty_cache()


def _stock_rows(model, base: dict, budget: int, device: torch.device, workloads: list[BenchWorkload], new_tokens: int,
                seed: int, on_row: Callable[[dict], None] | None) -> list[dict]:
    """Stock with accelerate's offloading dispatch for the budget (on CPU: the plain model), short runs."""
    cuda = device.type == "cuda"
    device_map = _dispatch_stock(model, budget, device) if cuda else None
    rows = []
    try:
        for workload in workloads:
            short = BenchWorkload(workload.batch, workload.prompt_len, new_tokens)
            _reset_peak(device)
            try:
                input_ids = _prompt(model, short, device, seed)
                row = _timed_runs(model, input_ids, new_tokens, 1, offloaded=False, seed=seed, warmup_tokens=2)
            except Exception as error:  # reported in the row; ours still run
                logger.warning("stock with an offloading device map failed at batch %d: %s", short.batch, error)
                row = {"error": f"{type(error).__name__}: {error}", "decode_tokens_per_s": None}
            if device_map is not None:
                row["pcie_bytes_per_token"] = _offloaded_bytes(model, device_map) / workload.batch
            rows.append({**base, "system": "stock device_map" if cuda else "stock (cpu)", **short.__dict__, **row,
                         "peak_memory_gib": _peak_gib(device)})
            if on_row:
                on_row(rows[-1])
    finally:
        if device_map is not None:
            _undispatch_stock(model)
    return rows


def _sized_for(options: OffloadOptions, workloads: list[BenchWorkload]) -> OffloadOptions:
    """`options` with room for the largest workload's prefill and static cache (graph decode's length bucket)."""
    prefill = max((w.batch * w.prompt_len for w in workloads), default=0)
    kv = max((w.batch * length_bucket(w.prompt_len + w.new_tokens) for w in workloads), default=0)
    return dataclasses.replace(options, prefill_tokens=max(options.prefill_tokens, prefill),
                               kv_cache_tokens=max(options.kv_cache_tokens, kv))


def _our_rows(model, base: dict, budget: int, device: torch.device, workloads: list[BenchWorkload], repeats: int,
              options: OffloadOptions, seed: int, on_row: Callable[[dict], None] | None,
              round_trip_row: bool) -> list[dict]:
    """Ours, then (`round_trip_row`, with zero-copy on) ours with zero-copy off, then fetch-every-miss, per
    workload; peak GPU memory since accelerate()."""
    _reset_peak(device)
    accelerate(model, gpu_memory=budget, offload=options)
    plan, costs, zero_copy = offload_budget(model), offload_miss_costs(model), offload_options(model).zero_copy
    rows = []
    try:
        for workload in tqdm(workloads, desc=f"offload {base['model']}", unit="run"):
            input_ids = _prompt(model, workload, device, seed)
            # fetch-every-miss is our engine without the cost model and without zero-copy decode
            systems = [("ours", options.miss_policy, zero_copy)]
            if round_trip_row and zero_copy:
                systems.append(("ours, no zero-copy", options.miss_policy, False))
            systems.append(("ours fetch-every-miss", "fetch", False))
            for system, policy, zero_copy_on in systems:
                set_miss_policy(model, policy)
                set_zero_copy(model, zero_copy_on)
                row = _timed_runs(model, input_ids, workload.new_tokens, repeats, offloaded=True, seed=seed)
                rows.append({**base, "system": system, **workload.__dict__, **row, "slots_per_layer": list(plan.slots),
                             "miss_costs": costs and dataclasses.asdict(costs)})
                if on_row:
                    on_row(rows[-1])
        peak = _peak_gib(device)
        for row in rows:
            row["peak_memory_gib"] = peak  # since accelerate(): weights, slots, every run
            row["within_budget"] = None if peak is None else peak * 2**30 <= budget
    finally:
        unpatch(model)
    return rows


def run_offload_bench(
    model: nn.Module,
    model_name: str,
    gpu_memory: str | int,
    workloads: list[BenchWorkload],
    *,
    repeats: int = 3,
    stock_new_tokens: int = 3,
    stock_batches: list[int] | None = None,
    options: OffloadOptions | None = None,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
    round_trip_row: bool = False,
) -> list[dict]:
    """One row per (system, workload): decode tokens/s, TTFT, peak GPU memory, and for ours the
    decode hit rate, PCIe bytes, fetches and CPU experts per token, speedups against stock and
    against fetch-every-miss.

    `model` is on the CPU as the user loaded it (pageable memory): stock runs first, on those
    weights; `accelerate(gpu_memory=...)` then pins the experts. Stock copies every offloaded layer
    at every step, so it runs `stock_new_tokens` tokens once after a 2-token warm-up, at the
    `stock_batches` only (default: all). Without CUDA the CPU stands in for the GPU side (no
    speed-up; for checking the command) and "stock" is the plain model on the CPU. `on_row` sees
    each row as soon as it is measured (a long run that is cut off keeps what it measured).
    `round_trip_row` adds ours with zero-copy decode off (the expert cache's round trip every step).
    """
    budget = parse_memory_size(gpu_memory)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    options = _sized_for(options or OffloadOptions(device=device), workloads)
    if (setup := prepare_offload(model, budget, options)).caches_every_expert:
        raise ValueError(f"{model_name} fits whole in {format_bytes(budget)} ({setup.budget.describe()}): nothing to "
                         "offload; give a smaller budget, or run the bench without --gpu-memory")
    base = {"model": model_name, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "gpu_memory": budget}
    stock_batches = sorted({w.batch for w in workloads}) if stock_batches is None else stock_batches
    stock_workloads = [w for w in workloads if w.batch in stock_batches]
    stock = _stock_rows(model, base, budget, device, stock_workloads, stock_new_tokens, seed, on_row)
    rows = _our_rows(model, base, budget, device, workloads, repeats, options, seed, on_row, round_trip_row)
    for row in rows:
        stock_rate = next((s["decode_tokens_per_s"] for s in stock if s["batch"] == row["batch"]), None)
        fetch = next(r for r in rows if r["batch"] == row["batch"] and r["system"] == "ours fetch-every-miss")
        row["speedup_vs_stock"] = row["decode_tokens_per_s"] / stock_rate if stock_rate else None
        row["speedup_vs_fetch"] = row["decode_tokens_per_s"] / fetch["decode_tokens_per_s"]
    return stock + rows


def markdown_table(rows: list[dict]) -> str:
    header = ["model", "system", "batch", "decode tok/s", "vs stock", "vs fetch-every-miss", "hit rate",
              "PCIe MiB/token", "prefetched/token (predictions right)", "CPU experts/token", "CPU expert ms/token", "peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in rows:
        cells = [
            r["model"], r["system"], str(r["batch"]), num(r["decode_tokens_per_s"], ".2f") if "error" not in r else "failed",
            num(r.get("speedup_vs_stock"), ".1f") + ("x" if r.get("speedup_vs_stock") else ""),
            num(r.get("speedup_vs_fetch"), ".2f") + ("x" if r.get("speedup_vs_fetch") else ""),
            num(r.get("hit_rate") and 100 * r["hit_rate"], ".1f") + ("%" if r.get("hit_rate") is not None else ""),
            num(r.get("pcie_bytes_per_token") and r["pcie_bytes_per_token"] / 2**20, ".1f"),
            num(r.get("prefetched_per_token"), ".1f") + (f" ({100 * r['prefetch_accuracy']:.0f}%)" if r.get("prefetch_accuracy") is not None else ""),
            num(r.get("cpu_experts_per_token"), ".1f"),
            num(r.get("cpu_expert_s_per_token") and 1e3 * r["cpu_expert_s_per_token"], ".2f"),
            num(r.get("peak_memory_gib"), ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Decode tokens/s per batch for each system (log scale: stock is orders of magnitude slower)."""
    plt = pyplot()
    batches = sorted({r["batch"] for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(batches)), 4.5))
    for i, system in enumerate(systems):
        rates = {r["batch"]: r["decode_tokens_per_s"] or 0 for r in rows if r["system"] == system}
        ax.bar([x + i * width for x in range(len(batches))], [rates.get(b, 0) for b in batches], width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set(ylabel="decode tokens/s", yscale="log",
           title=f"{rows[0]['model']}, GPU budget {rows[0]['gpu_memory'] / 2**30:.0f} GiB: offload decode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
