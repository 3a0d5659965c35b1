"""A/B runs: stock Transformers, then hf_moe_accel, then stock again, on the same weights.

Stock is timed before and after ours in the same process and the faster figure is the
baseline (BENCH_PROTOCOL.md: a first stock run on the GPU can be 2-3x slower than a later one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..api import accelerate, unpatch
from .hbm import decode_step_bytes
from .timing import copy_bandwidth_bytes_per_s, time_generate


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt_len: int
    new_tokens: int


def _prompt(model, workload: Workload, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(1, vocab, (workload.batch, workload.prompt_len), generator=generator)
    return ids.to(device)


def greedy_agreement(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Fraction of greedy tokens ours shares with stock (same positions), on one prompt batch."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    mask = torch.ones_like(input_ids)
    stock = model.generate(input_ids, attention_mask=mask, **kwargs)
    accelerate(model)
    ours = model.generate(input_ids, attention_mask=mask, **kwargs)
    unpatch(model)
    return (stock[:, input_ids.shape[1] :] == ours[:, input_ids.shape[1] :]).float().mean().item()


def run_ab(model, model_name: str, workloads: list[Workload], repeats: int = 3, seed: int = 0) -> list[dict]:
    """One result dict per workload: stock (best of before/after), ours, speedup, % of HBM limit."""
    device = next(model.parameters()).device
    bandwidth = copy_bandwidth_bytes_per_s(device) if device.type == "cuda" else None
    results = []
    for workload in tqdm(workloads, desc=f"A/B {model_name}", unit="run"):
        input_ids = _prompt(model, workload, device, seed)
        stock_before = time_generate(model, input_ids, workload.new_tokens, repeats)
        accelerate(model)
        ours = time_generate(model, input_ids, workload.new_tokens, repeats)
        unpatch(model)
        stock_after = time_generate(model, input_ids, workload.new_tokens, repeats)
        stock = max(stock_before, stock_after, key=lambda t: t.decode_tokens_per_s)
        row = {
            "model": model_name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            **workload.__dict__,
            "stock": {**stock.as_dict(), "before": stock_before.as_dict(), "after": stock_after.as_dict()},
            "ours": ours.as_dict(),
            "speedup": ours.decode_tokens_per_s / stock.decode_tokens_per_s,
        }
        if bandwidth is not None:
            context = workload.prompt_len + workload.new_tokens // 2
            step_bytes = decode_step_bytes(model, workload.batch, context)
            limit = workload.batch * bandwidth / step_bytes
            row["hbm_limit_tokens_per_s"] = limit
            row["copy_bandwidth_tb_per_s"] = bandwidth / 1e12
            row["ours_pct_of_hbm_limit"] = 100 * ours.decode_tokens_per_s / limit
            row["stock_pct_of_hbm_limit"] = 100 * stock.decode_tokens_per_s / limit
        results.append(row)
    return results


def markdown_table(results: list[dict]) -> str:
    has_limit = any("hbm_limit_tokens_per_s" in r for r in results)
    header = ["model", "batch", "stock tok/s", "ours tok/s", "speedup", "ours TTFT ms", "ours prefill tok/s", "peak GiB"]
    if has_limit:
        header += ["HBM limit tok/s", "ours % of limit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        peak = r["ours"]["peak_memory_gib"]
        cells = [
            r["model"],
            str(r["batch"]),
            f"{r['stock']['decode_tokens_per_s']:.1f}",
            f"{r['ours']['decode_tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{1e3 * r['ours']['ttft_s']:.1f}",
            f"{r['ours']['prefill_tokens_per_s']:.0f}",
            f"{peak:.1f}" if peak is not None else "-",
        ]
        if has_limit:
            cells += [f"{r['hbm_limit_tokens_per_s']:.0f}", f"{r['ours_pct_of_hbm_limit']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
