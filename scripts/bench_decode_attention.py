"""One-token decode attention: our Triton kernel against SDPA (bool mask, grouped heads folded onto
their KV head as `decode_attention_forward` does, so PyTorch picks cuDNN / efficient attention), on this GPU.

    python scripts/bench_decode_attention.py --out decode_attention.json [--sweep] [--valid-frac 0.5]

Each figure is the replay of a CUDA graph of 20 calls, microseconds a call (median of --reps
replays). The 20 calls cycle over enough copies of the KV cache (>= 256 MiB in all) that L2 does
not hold them, as in a decode step where every layer reads its own cache. Max abs error against
SDPA is checked first. --valid-frac < 1 masks the cache's tail (a static cache longer than the
sequence so far): our kernel skips loading masked keys, SDPA does not. --sweep also times launch
configs of ours (block_k, num_warps, num_stages, dots or not, splits, masked keys loaded or not) and reports the best.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_moe_accel.kernels.decode_attention import decode_attention, launch_plan

CALLS = 20
# --sweep: each launch config without splits, then splits over small key blocks (short caches at small
# batches: one loop iteration a program, many programs), then the best few without skipping masked keys' loads.
LAUNCH = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 2), (256, 8, 1)]
SPLIT_LAUNCH = [(16, 4, 1), (16, 2, 1), (32, 4, 1), (32, 4, 2), (32, 2, 1), (64, 4, 1), (64, 4, 2)]
SPLITS = (2, 4, 8, 16, 32)


def sweep(args_list, groups: int, keys: int, reps: int) -> list[tuple[float, dict]]:
    timed = []
    reference = sdpa_folded(*args_list[0]).float()

    def measure(config: dict) -> None:
        err = (decode_attention(*args_list[0], **config).float() - reference).abs().max().item()
        timed.append((graph_us(functools.partial(decode_attention, **config), args_list, reps),
                      {**config, "max_abs_err": float(f"{err:.2g}")}))

    for block_k, num_warps, num_stages in LAUNCH:
        for use_dot in (True, False) if groups <= 2 else (True,):
            measure(dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages, use_dot=use_dot, num_splits=1))
    use_dot = min(timed, key=lambda t: t[0])[1]["use_dot"]
    for block_k, num_warps, num_stages in SPLIT_LAUNCH:
        for splits in SPLITS:
            if splits * block_k <= keys:
                measure(dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages, use_dot=use_dot,
                             num_splits=splits))
    for _, config in sorted(timed, key=lambda t: t[0])[:4]:
        measure({**{k: v for k, v in config.items() if k != "max_abs_err"}, "skip_masked_keys": False})
    return sorted(timed, key=lambda t: t[0])


def sdpa_folded(query, key, value, mask, scale):
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    return F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale).reshape(query.shape)


def graph_us(fn, args_list, reps: int) -> float:
    """Microseconds a call: a CUDA graph of CALLS calls cycling over args_list, median over reps replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in args_list[:2]:
            fn(*args)  # compile / pick kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(*args_list[i % len(args_list)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("decode_attention.json"))
    parser.add_argument("--heads", default="32:4:128,16:16:128", help="Hq:Hkv:D,...")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--keys", default="256,1024,4096")
    parser.add_argument("--valid-frac", type=float, default=1.0, help="fraction of each cache the mask allows")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for shape in args.heads.split(","):
        heads, kv_heads, dim = map(int, shape.split(":"))
        for batch in map(int, args.batch.split(",")):
            for keys in map(int, args.keys.split(",")):
                kv_bytes = 2 * batch * kv_heads * keys * dim * dtype.itemsize
                copies = min(CALLS, max(2, math.ceil((256 << 20) / kv_bytes)))
                valid = max(1, round(keys * args.valid_frac))
                mask = (torch.arange(keys, device=device) < valid).expand(batch, 1, 1, keys).contiguous()
                scale = dim**-0.5
                args_list = [(torch.randn(batch, 1, heads, dim, device=device, dtype=dtype).transpose(1, 2),
                              torch.randn(batch, kv_heads, keys, dim, device=device, dtype=dtype),
                              torch.randn(batch, kv_heads, keys, dim, device=device, dtype=dtype), mask, scale)
                             for _ in range(copies)]
                ours_out, sdpa_out = decode_attention(*args_list[0]), sdpa_folded(*args_list[0])
                err = (ours_out.float() - sdpa_out.float()).abs().max().item()
                sdpa_us = graph_us(sdpa_folded, args_list, args.reps)
                ours_us = graph_us(decode_attention, args_list, args.reps)
                row = dict(heads=heads, kv_heads=kv_heads, dim=dim, batch=batch, keys=keys, valid=valid,
                           plan=launch_plan(batch, kv_heads, keys, dim, sms), max_abs_err=err,
                           sdpa_us=round(sdpa_us, 2), ours_us=round(ours_us, 2), speedup=round(sdpa_us / ours_us, 2))
                if args.sweep:
                    timed = sweep(args_list, heads // kv_heads, keys, args.reps)
                    row.update(best_us=round(timed[0][0], 2), best_config=timed[0][1],
                               sweep=[[round(us, 2), config] for us, config in timed])
                rows.append(row)
                print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
                args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                    rows=rows), indent=1))  # so far
                del args_list
                torch.cuda.empty_cache()

    columns = ["heads", "kv_heads", "dim", "batch", "keys", "valid", "plan", "max_abs_err", "sdpa_us", "ours_us",
               "speedup"] + (["best_us", "best_config"] if args.sweep else [])
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, us a call (CUDA graph of {CALLS})\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2g}" if c == "max_abs_err" else str(row[c]) for c in columns) + " |")
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
                                   indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
