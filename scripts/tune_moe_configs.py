"""Sweep the fused-experts block configs for one MoE layer shape on this GPU; write them as data.

    python scripts/tune_moe_configs.py --shape qwen3-30b-a3b --tokens 1,4,16,64,256,1024,4096 \
        --out hf_moe_accel/kernels/configs/

For each token count: the decode path (counts up to --decode-max) and the prefill path are tuned
separately (`--decode-only`: the decode path alone), each kernel by coordinate descent (gate_up with down at its default, then down with
the best gate_up; prefill once per BLOCK_M candidate), over a modest grid, then the best few
again with other num_stages. Every figure is the median replay of a CUDA graph that cycles over
4 copies of the weights (so L2 does not hold them), divided by 4. Each winner is checked against
`experts_reference`. The entry for the shape is merged into <out>/<device name>.json (format in
hf_moe_accel/kernels/tuning.py) and a table is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_moe_layer import SHAPES, make_expert_weights, random_routing, time_graph  # noqa: E402

from hf_moe_accel.kernels import tuning
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.kernels.experts_triton import fused_experts_triton

COPIES = 4
SMEM_BYTES = 200 * 1024  # stay under the H100/H200 227 KB per block with margin
MAX_REL_ERROR = 2e-2


class Layer:
    """4 weight copies of one shape and one token count's inputs; times a config on them."""

    def __init__(self, shape: dict, copies: list, tokens: int, seed: int = 0):
        self.shape, self.copies, self.tokens = shape, copies, tokens
        torch.manual_seed(seed)
        self.x = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
        self.topk_weights, self.topk_ids = random_routing(tokens, shape["E"], shape["k"])

    def time(self, config: dict) -> float:
        """Microseconds per call, or inf when the config fails to compile or run (e.g. out of resources)."""
        fns = [lambda w=w: fused_experts_triton(self.x, w, self.topk_ids, self.topk_weights, config=config)
               for w in self.copies]
        try:
            return time_graph(fns, max_reps=30, budget_s=0.15)[0]
        except Exception as error:  # a config the GPU cannot run is skipped, not fatal
            print(f"    skipped {config}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            torch.cuda.synchronize()
            return float("inf")

    def error(self, config: dict) -> float:
        out = fused_experts_triton(self.x, self.copies[0], self.topk_ids, self.topk_weights, config=config)
        ref = experts_reference(self.x, self.copies[0], self.topk_ids, self.topk_weights)
        return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def default_config(layer: Layer, path: str) -> dict:
    """The heuristic config (not tuned data already on disk): every run starts from the same point."""
    s = layer.shape
    return tuning.heuristic_config(path, s["E"], s["I"], s["H"], layer.tokens, s["k"], "cuda", s["transposed"])


def decode_grid(wide: bool = False) -> list[dict]:
    """Tiles of the decode kernels; `wide` adds narrow, long tiles (fewer K steps, more bytes in flight)."""
    block_ns, block_ks = ((2, 4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048)) if wide else ((8, 16, 32, 64), (128, 256, 512))
    grid = []
    for block_n, block_k, warps in itertools.product(block_ns, block_ks, (4, 8)):
        if block_n * block_k <= 16384:
            grid.append({"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": 2})
    return grid


def prefill_grid(block_m: int, gate_up: bool) -> list[dict]:
    tiles = [(32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (256, 64, 8)]
    grid = []
    for block_n, block_k, warps in tiles:
        b_tiles = 2 if gate_up else 1  # gate and up tiles (or one 2 * BLOCK_N interleaved tile)
        if 3 * (block_m * block_k + b_tiles * block_k * block_n) * 2 > SMEM_BYTES:
            continue
        config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}
        grid.append(config if gate_up else {**config, "SPLIT_K": 1})
    return grid


def block_m_candidates(tokens: int, top_k: int, experts: int) -> list[int]:
    rows = tokens * top_k / experts  # average rows per expert
    return [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows) and m >= min(64, rows / 2)]


def tune_part(layer: Layer, base: dict, part: str, grid: list[dict], changes: list[dict], top: int) -> tuple[float, dict]:
    """Best (us, params) for `part` of `base`: the grid, then its `top` best with each of `changes` applied."""
    ranked = sorted(((layer.time({**base, part: params}), params) for params in grid), key=lambda e: e[0])
    for _, params in ranked[:top]:
        for change in changes:
            candidate = {**params, **change}
            if candidate not in [p for _, p in ranked]:
                ranked.append((layer.time({**base, part: candidate}), candidate))
    return min(ranked, key=lambda e: e[0])


def tune_decode(layer: Layer, wide: bool = False) -> tuple[float, dict]:
    config = default_config(layer, "decode")
    changes = [{"num_stages": 1}, {"num_stages": 3}, {"num_warps": 2}]
    for part in ("gate_up", "down"):
        _, config[part] = tune_part(layer, config, part, decode_grid(wide), changes, top=2)
    return layer.time(config), config


def tune_prefill(layer: Layer) -> tuple[float, dict]:
    s = layer.shape
    best = (float("inf"), None)
    for block_m in block_m_candidates(layer.tokens, s["k"], s["E"]):
        config = {**default_config(layer, "prefill"), "BLOCK_M": block_m}
        stages = [{"num_stages": n} for n in (2, 4)]
        _, config["gate_up"] = tune_part(layer, config, "gate_up", prefill_grid(block_m, True), stages, top=1)
        down_changes = stages + [{"SPLIT_K": n} for n in (2, 4) if s["I"] >= 4096]
        _, config["down"] = tune_part(layer, config, "down", prefill_grid(block_m, False), down_changes, top=2)
        best = min(best, (layer.time(config), config), key=lambda e: e[0])
    return best


def checked(layer: Layer, name: str, result: tuple[float, dict]) -> tuple[float, dict] | None:
    micros, config = result
    if config is None or micros == float("inf"):
        print(f"  !!! {name}: no config ran")
        return None
    error = layer.error(config)
    if error > MAX_REL_ERROR:
        print(f"  !!! {name} winner {config} is WRONG: rel error {error:.2e} vs experts_reference; not saved")
        return None
    return micros, {k: v for k, v in config.items() if k != "path"}


def write_entry(out: Path, s: dict, entry: dict, decode_wins: list) -> tuple[str, Path, dict]:
    """Merge this shape's entry into <out>/<device>.json; returns (key, file, merged entry)."""
    # The decode path serves every count up to the last one where it won without a loss before.
    if decode_wins:
        entry["decode_max_tokens"] = max([0] + [t for t, _ in itertools.takewhile(lambda e: e[1], decode_wins)])
    key = tuning.shape_key(s["E"], s["I"], s["H"], s["k"], torch.bfloat16, s["transposed"])
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{torch.cuda.get_device_name().replace(' ', '_')}.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    old = data.get(key, {})
    merged = {**old, **{k: v for k, v in entry.items() if not isinstance(v, dict)}}
    for path in ("decode", "prefill"):
        merged[path] = {**old.get(path, {}), **entry[path]}
    data[key] = merged
    file.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return key, file, merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--decode-max", type=int, default=16, help="tune the decode path up to this many tokens")
    parser.add_argument("--out", type=Path, default=tuning.CONFIG_DIR)
    parser.add_argument("--decode-only", action="store_true",
                        help="tune the decode path alone: the prefill path keeps the heuristic, and which path a token "
                             "count takes keeps its default rule (no prefill timings to compare against)")
    parser.add_argument("--wide", action="store_true", help="a wider decode grid: BLOCK_N down to 2, BLOCK_K up to 2048")
    args = parser.parse_args()
    token_counts = sorted(int(t) for t in args.tokens.split(","))
    s = SHAPES[args.shape]
    start = time.perf_counter()
    copies = [make_expert_weights(s, seed=i) for i in range(COPIES)]

    entry: dict = {"decode": {}, "prefill": {}}
    rows = []
    decode_wins = []
    for tokens in token_counts:
        layer = Layer(s, copies, tokens)
        print(f"[{time.perf_counter() - start:6.0f}s] {args.shape} tokens={tokens}", flush=True)
        results = {} if args.decode_only else {"prefill": checked(layer, "prefill", tune_prefill(layer))}
        if tokens <= args.decode_max:
            results["decode"] = checked(layer, "decode", tune_decode(layer, args.wide))
        for path, result in results.items():
            if result is not None:
                entry[path][str(tokens)] = result[1]
        decode, prefill = results.get("decode"), results.get("prefill")
        if decode is not None and prefill is not None:
            decode_wins.append((tokens, decode[0] < prefill[0]))
        rows.append((tokens, decode, prefill))
        # Written after every token count, so a run cut short keeps what it measured.
        key, file, merged = write_entry(args.out, s, entry, decode_wins)

    print(f"\n{args.shape} ({key}) on {torch.cuda.get_device_name()}, {time.perf_counter() - start:.0f}s; wrote {file}")
    print("| tokens | decode us | prefill us | BLOCK_M | path used |")
    print("|---|---|---|---|---|")
    for tokens, decode, prefill in rows:
        if "decode_max_tokens" in merged:
            used = "decode" if tokens <= merged["decode_max_tokens"] else "prefill"
        else:
            used = "decode" if tuning.use_decode_path(s["E"], s["I"], s["H"], tokens, s["k"], torch.bfloat16, "cuda", s["transposed"]) else "prefill"
        d = f"{decode[0]:.1f}" if decode else "-"
        p = "not tuned" if args.decode_only else f"{prefill[0]:.1f}" if prefill else "FAILED"
        print(f"| {tokens} | {d} | {p} | {prefill[1]['BLOCK_M'] if prefill else '-'} | {used} |")
    if any(d is None for t, d, _ in rows if t <= args.decode_max) or (not args.decode_only and any(p is None for _, _, p in rows)):
        sys.exit(1)


if __name__ == "__main__":
    main()
