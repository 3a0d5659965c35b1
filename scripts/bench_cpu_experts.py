"""CPU expert compute (the offload's CPU lane) on this machine: half-precision GEMMs against the
float32 way (weights upcast a chunk at a time), and the crossover the calibration picks.

    python scripts/bench_cpu_experts.py                    # qwen3-30b-a3b's expert shape, bf16
    python scripts/bench_cpu_experts.py --hidden 4096 --inter 14336 --threads 16   # mixtral's

Prints the calibrated MissCostModel (no GPU: fetch_s is inf) and, per token count, the time per
expert of each way and of the one `accelerate(gpu_memory=...)` would choose. CPU only; seconds.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from hf_moe_accel.kernels.spec import Activation, ExpertWeights
from hf_moe_accel.offload.cpu_experts import run_cpu_experts
from hf_moe_accel.offload.eviction import LRUPolicy
from hf_moe_accel.offload.expert_cache import ExpertCache
from hf_moe_accel.offload.miss_cost import calibrate_miss_costs
from hf_moe_accel.offload.transfers import DeviceLanes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="one expert's inner size")
    parser.add_argument("--experts", type=int, default=8, help="experts per timed call")
    parser.add_argument("--tokens", default="1,4,16,64", help="token counts per expert")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights(
        gate_up=(torch.randn(args.experts, 2 * args.inter, args.hidden, generator=g) * 0.02).to(dtype),
        down=(torch.randn(args.experts, args.hidden, args.inter, generator=g) * 0.02).to(dtype),
        gate_up_bias=None, down_bias=None, transposed=False, interleaved=False, activation=Activation("silu"),
    )
    cpu = torch.device("cpu")
    costs = calibrate_miss_costs(ExpertCache(weights, 0, cpu, LRUPolicy(args.experts)), DeviceLanes(cpu))
    print(f"{torch.get_num_threads()} threads, expert {args.hidden}x{args.inter} {args.dtype}")
    print(f"calibrated: {costs}; float32 from {costs.upcast_from_tokens} tokens")
    print(f"| tokens | {args.dtype} ms/expert | float32 ms/expert | chosen ms/expert |")
    print("|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.hidden, generator=g).to(dtype)
        groups = [(e, torch.arange(tokens), torch.ones(tokens)) for e in range(args.experts)]
        cells = []
        for upcast_from in (math.inf, 1, costs.upcast_from_tokens):
            run_cpu_experts(x, weights, groups, upcast_from)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                run_cpu_experts(x, weights, groups, upcast_from)
            cells.append(f"{(time.perf_counter() - start) / args.repeats / args.experts * 1e3:.2f}")
        print(f"| {tokens} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
