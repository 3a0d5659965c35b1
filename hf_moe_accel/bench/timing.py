"""Timing of generate(): time to first token, decode tokens/s, prefill tokens/s, peak memory.

One generate() call gives both phases: a pass-through logits processor notes when the first
logits are ready (one device sync, at the first step only), so prefill and decode are split
without a second, one-token run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class GenerateTiming:
    ttft_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_memory_gib: float | None
    # The untimed first run: includes torch.compile / graph capture and other one-time work.
    warmup_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstLogitsClock(LogitsProcessor):
    """Notes the time the first logits are ready; leaves the scores alone."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_logits_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_logits_at is None:
            _sync(self.device)
            self.first_logits_at = time.perf_counter()
        return scores


def forced_greedy(model, input_ids: torch.Tensor, new_tokens: int, **generate_kwargs) -> torch.Tensor:
    """generate() of exactly `new_tokens` tokens after unpadded prompts `input_ids` [B, P] (the
    benchmarks' and evals' workload): [B, P + new_tokens]. Greedy unless `generate_kwargs` says
    do_sample=True."""
    options = {"do_sample": False, "pad_token_id": 0, **generate_kwargs}
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        **options,
    )


def sampling_kwargs(seed: int) -> dict:
    """generate() options that sample from the whole next-token distribution, with the global RNG seeded
    here: repeated runs decode the same tokens. Offload benchmarks decode this way on random weights,
    whose greedy text repeats one token (the same experts every step: nearly every lookup hits even
    with a small share of the experts cached), which no real text does."""
    torch.manual_seed(seed)
    return {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, sample_seed: int | None = None,
                   **generate_kwargs) -> tuple[float, float]:
    """(seconds to the first logits, seconds from there to the last token) of one generate() call:
    greedy, or sampled with `sample_seed` (`sampling_kwargs`)."""
    device = input_ids.device
    clock = _FirstLogitsClock(device)
    if sample_seed is not None:
        generate_kwargs = {**generate_kwargs, **sampling_kwargs(sample_seed)}
    _sync(device)
    start = time.perf_counter()
    forced_greedy(model, input_ids, new_tokens, logits_processor=LogitsProcessorList([clock]), **generate_kwargs)
    _sync(device)
    end = time.perf_counter()
    return clock.first_logits_at - start, end - clock.first_logits_at


def time_generate(model, input_ids: torch.Tensor, new_tokens: int, repeats: int, **generate_kwargs) -> GenerateTiming:
    """Warm up with a full-length decode, then take the median of `repeats` timed runs."""
    if new_tokens < 2:
        raise ValueError(f"decode timing needs at least 2 new tokens, got {new_tokens}")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    warm_start = time.perf_counter()
    timed_generate(model, input_ids, new_tokens, **generate_kwargs)
    warmup_s = time.perf_counter() - warm_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [timed_generate(model, input_ids, new_tokens, **generate_kwargs) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerateTiming(
        ttft_s=ttft,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
        prefill_tokens_per_s=batch * prompt_len / ttft,
        peak_memory_gib=peak,
        warmup_s=warmup_s,
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
