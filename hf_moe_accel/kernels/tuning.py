"""Block configs for the fused-experts kernels: tuned data per device, else a heuristic.

Tuned data lives in `configs/<device name, spaces as _>.json` (e.g. NVIDIA_H100_80GB_HBM3.json),
written by `scripts/tune_moe_configs.py`:

    {
      "E=128,N=768,K=2048,topk=8,dtype=bfloat16": {    # N: intermediate size, K: hidden size;
                                                       # ",transposed" ends the key for [E, H, 2I] weights
        "decode_max_tokens": 4,                        # the decode path serves num_tokens <= this
        "decode": {"1": {"gate_up": {...}, "down": {...}}, "4": {...}},
        "prefill": {"16": {"BLOCK_M": 16, "gate_up": {...}, "down": {...}}, "64": {...}}
      }
    }

Each "gate_up" / "down" entry holds the launch parameters of that kernel, passed through as is:
BLOCK_N, BLOCK_K, num_warps, num_stages, plus GROUP_M (prefill) and SPLIT_K (prefill down). The
token-count key nearest to the call's token count is used, as in vLLM. A top-k absent from the
file for a shape that is there (fewer activated experts: `accelerate(model, top_k=...)`) uses the
nearest tuned top-k's entry at the same number of (token, expert) pairs: per expert, the GEMMs see
the same rows. Block-scaled FP8 weights have their own keys ("dtype=float8_e4m3fn"); a shape tuned
in bf16 only lends them its bf16 entry (same kernels and grid; `experts_triton.fit_scale_blocks` then
cuts BLOCK_K to the scale block). Shapes absent from the file, and every shape under
TRITON_INTERPRET=1 (small blocks, fast CPU tests), use a heuristic.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Literal

import torch
import triton

KernelPath = Literal["decode", "prefill"]


def address_path(num_tokens: int) -> KernelPath:
    """The kernel path `fused_experts_at` takes for a forward of `num_tokens` tokens: the decode path
    (one program per pair, no sort) for one token, whose top-k experts are distinct; the grouped
    prefill path above that, which reads an expert shared by several tokens once per forward
    rather than once per pair (bytes over PCIe when the expert is in host memory)."""
    return "decode" if num_tokens <= 1 else "prefill"


CONFIG_DIR = Path(__file__).parent / "configs"

# Weight dtypes whose tuned entries fall back to another dtype's entry of the same shape.
_FALLBACK_DTYPES = {torch.float8_e4m3fn: torch.bfloat16, torch.float8_e5m2: torch.bfloat16}

_INTERPRETER_CONFIGS = {
    "decode": {
        "gate_up": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
        "down": {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    },
    "prefill": {
        "BLOCK_M": 16,
        "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1},
        "down": {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1},
    },
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def shape_key(num_experts: int, N: int, K: int, top_k: int, dtype: torch.dtype, transposed: bool = False) -> str:
    """The JSON key of one MoE layer shape (N = intermediate size, K = hidden size)."""
    key = f"E={num_experts},N={N},K={K},topk={top_k},dtype={str(dtype).removeprefix('torch.')}"
    return key + ",transposed" if transposed else key


def device_config_file(device: torch.device | str) -> Path:
    return CONFIG_DIR / f"{torch.cuda.get_device_name(device).replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def load_config_file(file: Path) -> dict:
    """A device's tuned data (the fused experts' shapes, and "decode_linear": `decode_linear.py`); {} without a file."""
    return json.loads(file.read_text()) if file.is_file() else {}


@functools.lru_cache(maxsize=256)
def _tuned(num_experts, N, K, top_k, dtype, device, transposed) -> tuple[dict, int] | None:
    """(the tuned entry, the top-k it was tuned for): this top-k's, else the nearest tuned one's of the
    same shape (the larger on a tie); None without data."""
    if interpreting() or torch.device(device).type != "cuda":
        return None
    data = load_config_file(device_config_file(device))
    by_top_k = {}
    for tuned_top_k in range(1, num_experts + 1):
        entry = data.get(shape_key(num_experts, N, K, tuned_top_k, dtype, transposed))
        if entry is not None:
            by_top_k[tuned_top_k] = entry
    if not by_top_k:
        fallback = _FALLBACK_DTYPES.get(dtype)
        return None if fallback is None else _tuned(num_experts, N, K, top_k, fallback, device, transposed)
    nearest = min(by_top_k, key=lambda tuned_top_k: (abs(tuned_top_k - top_k), -tuned_top_k))
    return by_top_k[nearest], nearest


def use_decode_path(
    num_experts: int, N: int, K: int, num_tokens: int, top_k: int, dtype: torch.dtype,
    device: torch.device | str, transposed: bool = False,
) -> bool:
    """Whether `num_tokens` tokens take the decode (GEMV, unsorted) path rather than the sorted GEMMs.

    Default without data: decode while the pairs rarely share an expert (tokens x top_k at most a
    quarter of the experts, or one token), since the decode path reads an expert once per pair.
    """
    tuned = _tuned(num_experts, N, K, top_k, dtype, device, transposed)
    if tuned is not None and "decode_max_tokens" in tuned[0]:
        entry, tuned_top_k = tuned
        return num_tokens * top_k <= entry["decode_max_tokens"] * tuned_top_k
    return num_tokens * top_k <= max(top_k, num_experts // 4)


@functools.lru_cache(maxsize=4096)
def get_config(
    path: KernelPath, num_experts: int, N: int, K: int, num_tokens: int, top_k: int, dtype: torch.dtype,
    device: torch.device | str, transposed: bool = False,
) -> dict:
    """Launch parameters of `path` ("decode" or "prefill") for one layer shape and token count.

    N is the intermediate size and K the hidden size. Returns {"path", "gate_up", "down"} and, for
    prefill, "BLOCK_M" (shared by both GEMMs: it is the sort's padding). Treat it as read-only.
    """
    tuned = _tuned(num_experts, N, K, top_k, dtype, device, transposed)
    if tuned is not None and tuned[0].get(path):
        (entry, tuned_top_k), pairs = tuned, num_tokens * top_k
        by_tokens = entry[path]
        nearest = min(by_tokens, key=lambda tokens: abs(int(tokens) * tuned_top_k - pairs))
        return {"path": path, **by_tokens[nearest]}
    return heuristic_config(path, num_experts, N, K, num_tokens, top_k, device, transposed)


def heuristic_config(
    path: KernelPath, num_experts: int, N: int, K: int, num_tokens: int, top_k: int,
    device: torch.device | str, transposed: bool = False,
) -> dict:
    """`get_config` without tuned data (also the tuner's starting point)."""
    if interpreting():
        return {"path": path, **_INTERPRETER_CONFIGS[path]}
    if path == "decode":
        return {"path": path, **_decode_heuristic(transposed)}
    return {"path": path, **_prefill_heuristic(num_experts, N, K, num_tokens * top_k, device)}


def _decode_heuristic(transposed: bool) -> dict:
    # A weight tile is read along its contiguous axis: K (the reduction) in the default layout,
    # N when transposed. Small BLOCK_N gives enough programs to cover the GPU at one token.
    if transposed:
        tile = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    else:
        tile = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}
    return {"gate_up": dict(tile), "down": dict(tile)}


def prefill_block_m(num_pairs: int, num_experts: int) -> int:
    """The untuned prefill path's BLOCK_M: the rows of one expert's tile (each tile reads the expert's weights)."""
    rows_per_expert = num_pairs / num_experts
    return 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64


def _prefill_heuristic(num_experts: int, intermediate: int, hidden: int, num_pairs: int, device) -> dict:
    block_m = prefill_block_m(num_pairs, num_experts)
    block_n = 64 if block_m <= 32 else 128
    warps = 4 if block_m * block_n <= 64 * 64 else 8
    gemm = {"BLOCK_N": block_n, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}
    # Split the down GEMM's long reduction (K = intermediate size) when its tiles alone would
    # leave most SMs idle, e.g. Mixtral (I = 14336) at a few tokens.
    tiles = (min(num_pairs, num_experts) + num_pairs // block_m) * triton.cdiv(hidden, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split_k = 1
    while split_k < 4 and tiles * split_k < sms and intermediate // (split_k * 2) >= 1024:
        split_k *= 2
    return {"BLOCK_M": block_m, "gate_up": gemm, "down": {**gemm, "SPLIT_K": split_k}}
