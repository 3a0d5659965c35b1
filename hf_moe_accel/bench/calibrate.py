"""Short microbenchmarks of this machine, cached to a JSON file (`hf-moe-accel plan --calibrate` re-measures).

Measured: HBM copy bandwidth, bf16 GEMM rate, pinned PCIe bandwidth, the GPU-to-GPU link when the
process sees several GPUs, the CPU's expert-matmul rates, and the time of our own decode path on
tiny patched models (hidden 256, so their bytes are negligible and what remains is overhead):
eager host time per layer and per step; under graph replay the host loop, the part of it the GPU
waits for and the GPU floor per layer; and the offload engine's host round trip per MoE layer.
The result is a `Hardware`; later runs read it back from the cache file. The target is under a minute
in all; `python scripts/check_predictor.py` times a fresh calibration against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from ..costmodel.hardware import GIB, Hardware
from ..costmodel.machine import cache_path, load_calibration, uncalibrated_hardware

logger = logging.getLogger("hf_moe_accel")


def calibrate(*, refresh: bool = False, progress: bool = True) -> Hardware:
    """Measure this machine (or read the cache written by an earlier call); needs a CUDA GPU."""
    path = cache_path()
    if not refresh:
        cached = load_calibration(path)
        if cached is not None:
            logger.info("hf_moe_accel: calibration read from %s", path)
            return cached
    if not torch.cuda.is_available():
        raise ValueError("calibration measures a CUDA GPU and there is none here; plan with --hardware PRESET or a JSON file")
    base = uncalibrated_hardware()
    device = torch.device("cuda", 0)
    start = time.perf_counter()
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("HBM bandwidth", lambda: {"hbm_tb_s": _hbm_tb_s(device)}),
        ("GEMM rate", lambda: {"gemm_tflops": _gemm_tflops(device)}),
        ("PCIe bandwidth", lambda: {"pcie_gb_s": _pcie_gb_s(device)}),
        ("GPU link", _link),
        ("CPU expert rate", lambda: _cpu_rates(device)),
        ("host time of decode", lambda: _host_overheads(device)),
    ]
    measured: dict = {}
    for label, step in tqdm(steps, desc="calibrating", unit="step", disable=not progress):
        measured.update(step())
        logger.info("hf_moe_accel: calibrated %s", label)
    seconds = time.perf_counter() - start
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hardware = dataclasses.replace(
        base,
        name="calibrated",
        host_memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        source=f"calibration {path} ({stamp})",
        **measured,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"hardware": hardware.to_json(), "seconds": seconds, "torch": torch.__version__}, indent=2))
    logger.info("hf_moe_accel: calibration took %.1f s, written to %s", seconds, path)
    return hardware


# ---- the microbenchmarks ---------------------------------------------------------------------


def _gpu_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median GPU time of fn() over `repeats`, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _hbm_tb_s(device: torch.device) -> float:
    from .timing import copy_bandwidth_bytes_per_s

    return copy_bandwidth_bytes_per_s(device) / 1e12


def _gemm_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _gpu_seconds(lambda: a @ b, repeats=10) / 1e12


def _pcie_gb_s(device: torch.device, nbytes: int = 256 << 20) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _gpu_seconds(lambda: dest.copy_(host, non_blocking=True), repeats=5) / 1e9


def _link() -> dict:
    """GPU 0 -> GPU 1 copies: bandwidth of 64 MiB, latency of 8 KiB (a decode step's hidden states).

    Timed by the host around both devices' synchronisation: a copy between devices runs on one
    device's stream, and events of the other would miss it.
    """
    if torch.cuda.device_count() < 2:
        return {}
    src = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src, device="cuda:1")

    def copy(source: torch.Tensor, dest: torch.Tensor):
        def run() -> None:
            dest.copy_(source)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)

        return run

    bandwidth = src.numel() / _cpu_seconds(copy(src, dst), repeats=5) / 1e9
    latency = _cpu_seconds(copy(src[: 8 << 10], dst[: 8 << 10]), repeats=20)
    return {"link_gb_s": bandwidth, "link_latency_us": 1e6 * latency}


def _cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_rates(device: torch.device | None, hidden: int = 4096, inner: int = 4096, matrices: int = 8) -> dict:
    """An expert-sized bf16 matmul on the CPU, as the offload's CPU lane meets it: each run on another of
    `matrices` weight matrices (32 MiB each: together larger than a CPU's caches, so the weights come
    from memory, as a missed expert's do), with the copy lane moving pinned memory to `device`
    meanwhile (its DMA reads host memory too). One matrix timed over and over on an idle host would
    stream from the CPU's caches, well above what the engine's CPU experts reach while decoding
    (`offload_stats(model)`'s cpu_expert_s). Streaming rate at 1 token, FLOP rate at 64."""
    weights = [torch.randn(inner, hidden, dtype=torch.bfloat16) for _ in range(matrices)]
    one, batch = torch.randn(1, hidden, dtype=torch.bfloat16), torch.randn(64, hidden, dtype=torch.bfloat16)
    with _copy_lane_busy(device):
        stream = weights[0].numel() * weights[0].element_size() / _cpu_seconds(_cycling(weights, one), 2 * matrices)
        flops = 2 * 64 * weights[0].numel() / _cpu_seconds(_cycling(weights, batch), matrices)
    return {"cpu_gb_s": stream / 1e9, "cpu_tflops": flops / 1e12}


def _cycling(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """x times the next of `weights` at each call (round robin): no run finds its weights in cache."""
    in_turn = itertools.cycle(weights)
    return lambda: torch.nn.functional.linear(x, next(in_turn))


@contextlib.contextmanager
def _copy_lane_busy(device: torch.device | None, nbytes: int = 256 << 20, copies: int = 64) -> Iterator[None]:
    """Within: `copies` host-to-device copies of `nbytes` of pinned memory queued on a side stream
    (16 GiB in all, to keep the lane busy through the CPU timings), as the offload's copy lane runs beside
    its CPU experts; nothing on CPU."""
    if device is None or device.type != "cuda":
        yield
        return
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for _ in range(copies):
            dest.copy_(host, non_blocking=True)
    try:
        yield
    finally:
        stream.synchronize()


# Tiny configs per family (hidden 256: their bytes are negligible, what's timed is overhead).
_TINY = {
    "qwen3_moe": dict(moe_intermediate_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, num_experts=16,
                  num_experts_per_tok=4, eos_token_id=None),
    "mixtral": dict(intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2),
}


def tiny_config(family: str, layers: int):
    """A tiny config of model type `family` (one of _TINY) with `layers` decoder layers."""
    from transformers import AutoConfig

    if family not in _TINY:
        raise ValueError(f"no tiny config for {family!r}; families: {', '.join(_TINY)}")
    return AutoConfig.for_model(family, hidden_size=256, num_hidden_layers=layers, vocab_size=1024, **_TINY[family])


def _tiny_model(layers: int, device: torch.device, family: str = "qwen3_moe"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.bfloat16).eval()


def _decode_step_s(model, device: torch.device, steps: int = 24) -> float:
    """Seconds per decode step of a greedy generate() at batch 1 (one-token run subtracted)."""
    ids = torch.randint(1, 1000, (1, 16), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(new: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    run(steps)  # compiles the kernels, captures the graphs
    return statistics.median((run(steps) - run(1)) / (steps - 1) for _ in range(3))


# Layer counts of the two tiny models whose eager steps give the host time per layer.
EAGER_LEVER = (2, 24)


def _host_overheads(device: torch.device) -> dict:
    """Decode-step overheads of our path, from tiny models whose GPU bytes are negligible.

    Eager: 2- and 24-layer models give the host time per layer and per step (a lever spanning a real
    model's depth: the host time per layer grows with depth, so a shallow lever underprices deep models;
    `python scripts/profile_eager_step.py --layers 2,8,48` shows the slope by depth). Graphs: a 3-layer model
    is host-bound (its replay hides behind generate()'s loop): the loop's time. 24- and 64-layer
    models are replay-bound: their slope is the GPU floor per layer, the intercept the host time
    the replay waits for. Offload: the 24-layer model with every expert in a slot, against eager.
    """
    from ..api import accelerate, unpatch
    from ..graphs import graph_stats

    short, deep = _tiny_model(EAGER_LEVER[0], device), _tiny_model(EAGER_LEVER[1], device)
    accelerate(short, cuda_graphs=False)
    accelerate(deep, cuda_graphs=False)
    step_short, step_deep = _decode_step_s(short, device), _decode_step_s(deep, device)
    per_layer = max((step_deep - step_short) / (EAGER_LEVER[1] - EAGER_LEVER[0]), 0.0)
    result = {"eager_layer_host_us": 1e6 * per_layer,
              "eager_step_host_us": 1e6 * max(step_short - EAGER_LEVER[0] * per_layer, 0.0)}
    result.update(_offload_round_trip_us(unpatch(deep).cpu(), step_deep, device))
    del short, deep

    graphed = {}
    for layers in (3, 24, 64):
        model = accelerate(_tiny_model(layers, device), cuda_graphs=True)
        step = _decode_step_s(model, device)
        if not (graph_stats(model) or {}).get("replays", 0):
            logger.warning("hf_moe_accel: graph decode didn't run in calibration; the graph figures stay the preset's")
            return result
        graphed[layers] = step
        del model
    layer_s = max((graphed[64] - graphed[24]) / 40, 0.0)
    exposed_s = max(graphed[24] - 24 * layer_s, 0.0)
    if graphed[24] < 1.2 * graphed[3]:
        logger.warning("hf_moe_accel: the 24-layer graph step (%.2f ms) is barely above the host loop (%.2f ms): "
                       "the graph floor per layer may be underestimated", 1e3 * graphed[24], 1e3 * graphed[3])
    result.update(graph_step_host_us=1e6 * graphed[3], graph_layer_us=1e6 * layer_s, graph_host_exposed_us=1e6 * exposed_s)
    return result


def _offload_round_trip_us(model, eager_step_s: float, device: torch.device) -> dict:
    """Per MoE layer, what the offload engine adds to an eager step when every expert is in a slot
    (so nothing is fetched or computed on the CPU): its host round trip. `model` on the CPU."""
    from ..api import accelerate, unpatch
    from ..offload.engine import OffloadOptions

    layers = model.config.num_hidden_layers
    options = OffloadOptions(slots_per_layer=model.config.num_experts, kv_cache_tokens=256, prefill_tokens=64, device=device,
                             zero_copy=False)  # the cache's round trip, which larger batches still take
    model = accelerate(model, gpu_memory="1GiB", offload=options)
    try:
        step = _decode_step_s(model, device)
    finally:
        unpatch(model)
    return {"offload_layer_host_us": 1e6 * max(step - eager_step_s, 0.0) / layers}
