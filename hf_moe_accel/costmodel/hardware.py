"""What the predictor knows about a machine: stated presets, JSON files, or a calibration.

Figures are kept in the units people read them in (GiB, TB/s, TFLOP/s, us) and are "achieved"
rates, not datasheet peaks: HBM is a device copy counting bytes read plus bytes written (as the
bench measures it), GEMM a large bf16 matmul, PCIe a pinned host-to-device copy, the link an
all-reduce's bus bandwidth. The host figures are the Python/launch time of our own decode path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


# Defaults of the overhead fields, for presets and for calibration files written before these fields
# existed. Each is what `hf-moe-accel plan --calibrate` measures on a machine (graph_host_exposed_us:
# generate()'s host loop the GPU waits for under replay; graph_layer_us: a replayed decoder layer's GPU
# time beyond its bytes; offload_layer_host_us: the expert cache's host round trip per MoE layer),
# except zero_copy_share, the rate of zero-copy reads from pinned host memory over the pinned copy rate,
# which `python scripts/bench_offload.py --preset qwen3-30b-a3b --gpu-memory 16GiB` re-derives
# (PCIe bytes per token over decode time, against the calibrated pcie_gb_s). How each default was
# derived: docs/BENCHMARKS.md, "Cost model".
_GRAPH_AND_OFFLOAD = dict(graph_host_exposed_us=600.0, graph_layer_us=95.0, offload_layer_host_us=1400.0,
                          zero_copy_share=0.8)


@dataclass(frozen=True)
class Hardware:
    """One machine: `gpu_count` identical GPUs, the host CPU, and the overheads of our decode path.

    gpu_memory_gib      memory of one GPU (or the budget planned for, `--gpu-memory`)
    hbm_tb_s            device copy bandwidth, bytes read + written per second / 1e12
    gemm_tflops         achieved dense bf16 matmul rate
    pcie_gb_s           pinned host -> device copy
    link_gb_s           all-reduce bus bandwidth between the GPUs (NVLink, or PCIe through the host)
    link_latency_us     time of a small all-reduce (one decode step's hidden states)
    cpu_gb_s            CPU streaming expert weights in a one-token matmul (bf16), all threads; calibrated
                        with the weights cold and host-to-GPU copies running, as offload decoding has them
    cpu_tflops          CPU matmul rate on a batch of tokens (bf16), all threads, measured the same way
    host_memory_gib     host RAM (offloaded experts live there, pinned)
    eager_layer_host_us host time per decoder layer of an eager decode step (launches, Python)
    eager_step_host_us  host time per eager decode step outside the layers (generate(), sampling)
    graph_step_host_us  host time of generate()'s loop per decode step under CUDA-graph replay
    graph_host_exposed_us the part of it the GPU waits for (before the replay is launched)
    graph_layer_us      GPU time per decoder layer of a graph replay beyond its bytes (kernel floors)
    offload_layer_host_us extra time per MoE layer of the offload engine's host round trip (all hits)
    zero_copy_share     the rate of the fused kernels reading experts from pinned host memory (zero-copy
                        decode), as a share of pcie_gb_s

    Calibration files without the last four read them as the defaults in _GRAPH_AND_OFFLOAD.
    """

    name: str
    gpu_name: str
    gpu_count: int
    gpu_memory_gib: float
    hbm_tb_s: float
    gemm_tflops: float
    pcie_gb_s: float
    link_gb_s: float
    link_latency_us: float
    cpu_gb_s: float
    cpu_tflops: float
    host_memory_gib: float
    eager_layer_host_us: float
    eager_step_host_us: float
    graph_step_host_us: float
    graph_host_exposed_us: float = _GRAPH_AND_OFFLOAD["graph_host_exposed_us"]
    graph_layer_us: float = _GRAPH_AND_OFFLOAD["graph_layer_us"]
    offload_layer_host_us: float = _GRAPH_AND_OFFLOAD["offload_layer_host_us"]
    zero_copy_share: float = _GRAPH_AND_OFFLOAD["zero_copy_share"]
    source: str = "preset"

    def with_gpus(self, count: int) -> Hardware:
        if count < 1:
            raise ValueError(f"the GPU count must be at least 1, got {count}")
        return dataclasses.replace(self, gpu_count=count)

    def with_gpu_memory(self, gib: float) -> Hardware:
        if gib <= 0:
            raise ValueError(f"the GPU memory must be positive, got {gib} GiB")
        return dataclasses.replace(self, gpu_memory_gib=gib)

    def describe(self) -> str:
        return (
            f"{self.gpu_count} x {self.gpu_name} ({self.gpu_memory_gib:.0f} GiB, HBM {self.hbm_tb_s:.2f} TB/s, "
            f"GEMM {self.gemm_tflops:.0f} TFLOP/s, PCIe {self.pcie_gb_s:.0f} GB/s"
            + (f", link {self.link_gb_s:.0f} GB/s / {self.link_latency_us:.0f} us" if self.gpu_count > 1 else "")
            + f"; CPU {self.cpu_gb_s:.0f} GB/s) [{self.source}]"
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Host time of our decode path, for presets until `hf-moe-accel plan --calibrate` measures the machine
# (eager: per decoder layer and per step outside the layers; graphs: generate()'s loop per step).
_HOST = dict(eager_layer_host_us=1500.0, eager_step_host_us=2000.0, graph_step_host_us=1500.0)
# Fields older calibrations and hardware files may still carry; read and ignored.
RETIRED_FIELDS = frozenset({"kernel_gap_us"})
# A 16-core server host (bf16 matmul through torch's CPU kernels); a calibration measures the real one.
_SERVER_CPU = dict(cpu_gb_s=20.0, cpu_tflops=0.5)

# One GPU of each kind; "NAMExN" in `hardware_preset` makes N of them.
_BASE_PRESETS: dict[str, Hardware] = {
    "h100": Hardware(
        "h100", "NVIDIA H100 80GB HBM3", 1, 79.1, hbm_tb_s=3.0, gemm_tflops=650.0, pcie_gb_s=50.0, link_gb_s=360.0,
        link_latency_us=10.0, host_memory_gib=128.0, **_SERVER_CPU, **_HOST,
    ),
    "h200": Hardware(
        "h200", "NVIDIA H200", 1, 139.8, hbm_tb_s=4.3, gemm_tflops=650.0, pcie_gb_s=50.0, link_gb_s=360.0,
        link_latency_us=10.0, host_memory_gib=128.0, **_SERVER_CPU, **_HOST,
    ),
    "a100": Hardware(
        "a100", "NVIDIA A100-SXM4-80GB", 1, 79.1, hbm_tb_s=1.7, gemm_tflops=270.0, pcie_gb_s=24.0, link_gb_s=200.0,
        link_latency_us=12.0, host_memory_gib=128.0, **_SERVER_CPU, **_HOST,
    ),
    "l40s": Hardware(
        "l40s", "NVIDIA L40S", 1, 44.4, hbm_tb_s=0.78, gemm_tflops=300.0, pcie_gb_s=24.0, link_gb_s=20.0,
        link_latency_us=25.0, host_memory_gib=128.0, **_SERVER_CPU, **_HOST,
    ),
    # GeForce cards have no peer-to-peer: the link goes through host memory.
    "rtx4090": Hardware(
        "rtx4090", "NVIDIA GeForce RTX 4090", 1, 23.6, hbm_tb_s=0.9, gemm_tflops=150.0, pcie_gb_s=24.0, link_gb_s=10.0,
        link_latency_us=30.0, cpu_gb_s=15.0, cpu_tflops=0.3, host_memory_gib=64.0, **_HOST,
    ),
}
# Host RAM of the multi-GPU machines these presets stand for, by GPU count.
_HOST_MEMORY_BY_COUNT = {8: 560.0, 4: 512.0, 2: 256.0}


def preset_names() -> list[str]:
    return [*_BASE_PRESETS, "h100x8", "h200x2", "h200x4", "h200x8", "a100x8", "rtx4090x2"]


def hardware_preset(name: str) -> Hardware:
    """A stated machine: a base GPU name (`h100`, `h200`, `a100`, `l40s`, `rtx4090`), optionally `xN`."""
    lowered = name.lower()
    for key, base in _BASE_PRESETS.items():
        match = re.fullmatch(rf"{key}(?:x(\d+))?", lowered)
        if match:
            break
    else:
        raise ValueError(
            f"unknown hardware preset {name!r}; presets: {', '.join(preset_names())} "
            "(any base name takes xN for N GPUs), or a JSON file"
        )
    count = int(match.group(1) or 1)
    host = _HOST_MEMORY_BY_COUNT.get(count, base.host_memory_gib)
    return dataclasses.replace(base, name=name.lower(), gpu_count=count, host_memory_gib=host, source=f"preset {name.lower()}")


# The valid range of each number of a hardware description: (lowest, whether the lowest itself is
# valid, highest, unit).
# Rates, bandwidths and sizes divide the predictor's byte and FLOP counts, so they must be positive;
# times only add, so zero is a valid figure; the zero-copy share is a share of the PCIe copy rate.
_TEXT_FIELDS = frozenset({"name", "gpu_name", "source"})
_INF = math.inf
FIELD_RANGES: dict[str, tuple[float, bool, float, str]] = {
    "gpu_count": (1, True, _INF, "GPUs"),
    **{name: (0, False, _INF, unit) for name, unit in (
        ("gpu_memory_gib", "GiB"), ("hbm_tb_s", "TB/s"), ("gemm_tflops", "TFLOP/s"), ("pcie_gb_s", "GB/s"),
        ("link_gb_s", "GB/s"), ("cpu_gb_s", "GB/s"), ("cpu_tflops", "TFLOP/s"), ("host_memory_gib", "GiB"))},
    **{name: (0, True, _INF, "us") for name in (
        "link_latency_us", "eager_layer_host_us", "eager_step_host_us", "graph_step_host_us", "graph_host_exposed_us",
        "graph_layer_us", "offload_layer_host_us")},
    "zero_copy_share": (0, False, 1, "a share of pcie_gb_s"),
}


def field_problem(name: str, value: object) -> str | None:
    """Why `value` can't be the Hardware field `name` (with the valid range), or None when it can."""
    if name in _TEXT_FIELDS:
        return None if isinstance(value, str) else f"field {name} must be a string, got {value!r}"
    low, low_allowed, high, unit = FIELD_RANGES[name]
    kind = "an integer" if name == "gpu_count" else "a number"
    bounds = f"{'>=' if low_allowed else '>'} {low:g}" if high == _INF else f"in ({low:g}, {high:g}]"
    expected = f"field {name} must be {kind} {bounds} ({unit})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{expected}, got {value!r}"
    in_range = math.isfinite(value) and (value >= low if low_allowed else value > low) and value <= high
    if not in_range or (name == "gpu_count" and not float(value).is_integer()):
        return f"{expected}, got {value!r}"
    return None


def hardware_from_json(path: str | Path) -> Hardware:
    """A JSON object of Hardware fields; `"base": PRESET` fills the fields it leaves out."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"can't read hardware description {path}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of hardware fields")
    fields = {f.name: f for f in dataclasses.fields(Hardware)}
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
    unknown = sorted(set(data) - set(fields) - {"base"})
    if unknown:
        raise ValueError(f"{path}: unknown hardware field(s) {', '.join(unknown)}; fields: base, {', '.join(fields)}")
    if "base" in data and not isinstance(data["base"], str):
        raise ValueError(f"{path}: \"base\" must be a preset name ({', '.join(preset_names())}), got {data['base']!r}")
    base = hardware_preset(data.pop("base")).to_json() if "base" in data else {}
    merged = {**base, **data, "source": data.get("source", f"file {path}")}
    missing = sorted(name for name, f in fields.items() if name not in merged and f.default is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)} (or give \"base\": a preset to fill them)")
    for name in sorted(data.keys() & fields.keys()):  # the base's own figures are valid
        if (problem := field_problem(name, merged[name])) is not None:
            raise ValueError(f"{path}: {problem}")
    merged["gpu_count"] = int(merged["gpu_count"])  # 2.0 in a file is 2 GPUs
    return Hardware(**merged)


def resolve_hardware(spec: str) -> Hardware:
    """`--hardware`: a preset name, or the path of a JSON file."""
    if spec.endswith(".json") or Path(spec).is_file():
        return hardware_from_json(spec)
    return hardware_preset(spec)


def preset_for_gpu_name(gpu_name: str) -> Hardware | None:
    """The base preset of a GPU by its CUDA name (fills what a calibration doesn't measure)."""
    lowered = gpu_name.lower().replace(" ", "")
    for key, hardware in _BASE_PRESETS.items():
        if key in lowered:
            return hardware
    return None
