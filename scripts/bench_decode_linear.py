"""The decode-step linears: our one launch against cuBLAS (`F.linear`, one launch per linear); tunes them.

    python scripts/bench_decode_linear.py --rows 1,2,4 --out OUT [--write]

Per model shape, the q/k/v projections (one launch for all three against three F.linear calls) and
the router (o_proj with --linears qkv,o,router, for comparison), at each row count (tokens):
microseconds per call as the replay of one CUDA graph cycling over 8 weight copies (so L2 does not
hold them), for a small grid of block configs, each checked against F.linear first. Prints a
markdown table; JSON (every config's time) to OUT/decode_linear.json. `--write`: the best config per
shape and row count, or null where cuBLAS is faster, merged into
hf_moe_accel/kernels/configs/<device>.json under "decode_linear" (format: kernels/decode_linear.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_moe_layer import time_graph  # noqa: E402

from hf_moe_accel.kernels import tuning
from hf_moe_accel.kernels.decode_linear import (
    DEFAULT_CONFIG,
    decode_linears_triton,
    shape_key,
)

COPIES = 8
# (name, hidden, output sizes of the linears launched together)
SHAPES = {
    "qwen3-30b-a3b": [("qkv", 2048, (4096, 512, 512)), ("o", 4096, (2048,)), ("router", 2048, (128,))],
    "olmoe-1b-7b": [("qkv", 2048, (2048, 2048, 2048)), ("o", 2048, (2048,)), ("router", 2048, (64,))],
    "mixtral-8x7b": [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)), ("router", 4096, (8,))],
    "gpt-oss-20b": [("qkv", 2880, (4096, 512, 512)), ("o", 4096, (2880,)), ("router", 2880, (32,))],
}
GRID = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w} for n, k, w in itertools.product((8, 16), (128, 256, 512), (4, 8))
        if n * k <= 4096 or w == 8]
# --wide: narrow, long tiles (fewer K steps, more bytes in flight per program) and deeper pipelining.
WIDE_GRID = [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": w} for n, k, w in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8))
             if n * k <= 16384] + [{"BLOCK_N": n, "BLOCK_K": k, "num_warps": 8, "num_stages": s}
                                   for n, k, s in itertools.product((4, 8), (256, 512), (1, 4))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--linears", default="qkv,router")
    parser.add_argument("--out", default=".")
    parser.add_argument("--write", action="store_true", help="merge the winners into the device's config file")
    parser.add_argument("--wide", action="store_true", help="also time WIDE_GRID's configs")
    args = parser.parse_args()
    tuned: dict[str, dict] = {}
    results = []
    print("| shape | linear | rows | MiB | cuBLAS us | ours default us | ours best us | best config | TB/s (best) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for name, hidden, sizes in SHAPES[shape]:
            if name not in args.linears.split(","):
                continue
            copies = [[torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5 for n in sizes] for _ in range(COPIES)]
            mib = sum(sizes) * hidden * 2 / 2**20
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
                reference = [F.linear(x.float(), w.float()) for w in copies[0]]
                cublas, _ = time_graph([lambda ws=ws, x=x: [F.linear(x, w) for w in ws] for ws in copies])
                timings = {}
                for config in [DEFAULT_CONFIG, *GRID, *(WIDE_GRID if args.wide else [])]:
                    key = json.dumps(config, sort_keys=True)
                    if key in timings:
                        continue
                    got = decode_linears_triton(x, copies[0], [None] * len(sizes), config=config)
                    error = max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, reference))
                    if error > 2e-2:
                        raise SystemExit(f"{shape} {name} rows={rows} {config}: relative error {error:.2e}")
                    timings[key] = time_graph([lambda ws=ws, c=config, x=x: decode_linears_triton(x, ws, [None] * len(ws), config=c)
                                               for ws in copies])[0]
                default = timings[json.dumps(DEFAULT_CONFIG, sort_keys=True)]
                best_key = min(timings, key=timings.get)
                best = timings[best_key]
                row = dict(shape=shape, linear=name, rows=rows, mib=mib, cublas_us=cublas, ours_default_us=default,
                           ours_best_us=best, best_config=json.loads(best_key), all_us=timings)
                tuned.setdefault(shape_key(sizes, hidden), {})[str(rows)] = json.loads(best_key) if best < cublas else None
                results.append(row)
                print(f"| {shape} | {name} | {rows} | {mib:.1f} | {cublas:.2f} | {default:.2f} | {best:.2f} | {best_key} | "
                      f"{mib * 2**20 / best / 1e6:.2f} |", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_linear.json").write_text(json.dumps(results, indent=1))
    if args.write:
        file = tuning.device_config_file("cuda")
        data = json.loads(file.read_text()) if file.is_file() else {}
        for key, by_rows in tuned.items():
            data.setdefault("decode_linear", {}).setdefault(key, {}).update(by_rows)
        file.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {file}")


if __name__ == "__main__":
    main()
