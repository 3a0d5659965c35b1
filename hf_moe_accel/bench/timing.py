"""Timing of generate(): time to first token, decode tokens/s, peak memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class GenerateTiming:
    ttft_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_memory_gib: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    _sync(input_ids.device)
    start = time.perf_counter()
    model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    _sync(input_ids.device)
    return time.perf_counter() - start


def time_generate(model, input_ids: torch.Tensor, new_tokens: int, repeats: int) -> GenerateTiming:
    """Warm up with a full-length decode, then take the median of `repeats` timed runs."""
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    _timed_generate(model, input_ids, new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft = statistics.median(_timed_generate(model, input_ids, 1) for _ in range(repeats))
    total = statistics.median(_timed_generate(model, input_ids, new_tokens) for _ in range(repeats))
    decode_s = max(total - ttft, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerateTiming(
        ttft_s=ttft,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
        prefill_tokens_per_s=batch * prompt_len / ttft,
        peak_memory_gib=peak,
    )


def copy_bandwidth_bytes_per_s(device: torch.device, size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (median of 10)."""
    src = torch.empty(size_bytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size_bytes / statistics.median(times)
