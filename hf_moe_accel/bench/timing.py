"""Timing of generate(): time to first token, decode tokens/s, prefill tokens/s, peak memory, and
the start-up of a process (from a setup such as accelerate() to the first token).

A full-length generate() call gives both phases: a pass-through logits processor notes when the
first logits are ready (one device sync, at the first step only), the point that splits prefill
from decode. Time to first token as a request sees it is, on request, a generate() call of one new
token timed whole (its setup, prefill, first token and return), repeated apart from the
full-length runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class GenerateTiming:
    # Time to first token: the one-token generate() calls' median where they ran
    # (`time_generate(..., one_token_ttft=True)`), else `first_logits_s`.
    ttft_s: float
    decode_tokens_per_s: float
    # Prompt tokens over `ttft_s`.
    prefill_tokens_per_s: float
    peak_memory_gib: float | None
    # The untimed first run: includes torch.compile / graph capture and other one-time work.
    warmup_s: float
    # Median time from the call to the first logits inside the full-length runs: where decode starts.
    first_logits_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StartTiming:
    """A process's first generate() after a setup step, every figure from the setup's start."""

    setup_s: float
    first_token_s: float
    first_generate_s: float

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


def time_first_token(model, input_ids: torch.Tensor, **generate_kwargs) -> float:
    """Seconds of one greedy generate() call of one new token, from the call to its return with the
    device synchronized: a request's time to first token (generate()'s setup and cache included)."""
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    forced_greedy(model, input_ids, 1, **generate_kwargs)
    _sync(device)
    return time.perf_counter() - start


def time_generate(model, input_ids: torch.Tensor, new_tokens: int, repeats: int, one_token_ttft: bool = False,
                  **generate_kwargs) -> GenerateTiming:
    """Warm up with a full-length decode, then take the median of `repeats` timed runs. With
    `one_token_ttft`, then one untimed and `repeats` timed one-token calls (`time_first_token`),
    whose median is the time to first token; without it, the time to the first logits of the
    full-length runs is."""
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
    first_logits = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    ttft = first_logits
    if one_token_ttft:
        time_first_token(model, input_ids, **generate_kwargs)  # a one-token call may set up what a longer one didn't
        ttft = statistics.median(time_first_token(model, input_ids, **generate_kwargs) for _ in range(repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return GenerateTiming(
        ttft_s=ttft,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s,
        prefill_tokens_per_s=batch * prompt_len / ttft,
        peak_memory_gib=peak,
        warmup_s=warmup_s,
        first_logits_s=first_logits,
    )


def time_start(setup: Callable[[], object], model, input_ids: torch.Tensor, new_tokens: int,
               **generate_kwargs) -> StartTiming:
    """`setup()` (e.g. accelerate(model)) and then the first full-length generate() call, timed from
    the setup's start: to the setup's end, to the first logits, to the call's return. Meant as the
    first thing a process runs on the model, so that the first call pays every one-time cost
    (kernel compiles, graph captures, torch.compile) that the process's caches don't spare it."""
    device = input_ids.device
    _sync(device)
    start = time.perf_counter()
    setup()
    _sync(device)
    setup_s = time.perf_counter() - start
    first_logits_s, rest_s = timed_generate(model, input_ids, new_tokens, **generate_kwargs)
    return StartTiming(setup_s=setup_s, first_token_s=setup_s + first_logits_s,
                       first_generate_s=setup_s + first_logits_s + rest_s)


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
