"""generate()'s host time per decode step on the CPU, with our graph runner's replays made no-ops.

    python scripts/profile_host_step.py --family olmoe [--no-eos] [--profile]

A narrow model (hidden 64) with the layer count and vocabulary of olmoe-1b-7b or qwen3-30b-a3b is
accelerated and served by the graph runner with a stand-in capture whose replay does nothing, so what
is timed is the host's own work in a decode step: generate()'s loop (inputs, logits processors,
stopping checks) plus the runner's input copies. With the model's EOS token (olmoe's config has one,
qwen3's preset none), min_new_tokens adds two processors over the whole vocabulary each step (in the
calls we serve, stand-ins of one masked fill each: graphs/processors.py); here on CPU tensors that is
compute, on a GPU a kernel launch each. Also printed: the runner's own share
(its calls timed: input copies, replay, output hand-out). `--profile`: cProfile of one call.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_accel import accelerate
from hf_moe_accel.graphs.generate import GraphBackend, enable_graph_decode
from hf_moe_accel.graphs.runner import DecodeGraphs

FAMILIES = {
    "olmoe": dict(model_type="olmoe", num_hidden_layers=16, vocab_size=50304, eos_token_id=50279,
                  intermediate_size=32, num_key_value_heads=4),
    "qwen3": dict(model_type="qwen3_moe", num_hidden_layers=48, vocab_size=151936, eos_token_id=151645,
                  moe_intermediate_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=16),
}


def _no_op_capture(forward, pool):
    return (lambda: None), forward()


class _RunnerClock:
    """Times every DecodeGraphs call (the runner's host work per decode step)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._call = DecodeGraphs.__call__
        clock = self

        def timed_call(runner, **kwargs):
            start = time.perf_counter()
            try:
                return clock._call(runner, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start
                clock.calls += 1

        DecodeGraphs.__call__ = timed_call

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=sorted(FAMILIES), default="olmoe")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-eos", action="store_true", help="a config without an EOS token")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one generate() call")
    args = parser.parse_args()
    shape = dict(FAMILIES[args.family])
    model_type = shape.pop("model_type")
    if args.no_eos:
        shape["eos_token_id"] = None
    config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, num_experts=8,
                                  num_experts_per_tok=2, **shape)
    model = AutoModelForCausalLM.from_config(config).eval()
    accelerate(model, cuda_graphs=False)
    enable_graph_decode(model, GraphBackend("cpu", _no_op_capture))
    ids = torch.randint(1, 1000, (1, 16))

    def seconds(new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    runner_clock = _RunnerClock()
    seconds(args.new_tokens)  # captures
    one = min(seconds(1) for _ in range(3))
    full = min(seconds(args.new_tokens) for _ in range(3))
    runner_clock.reset()
    seconds(args.new_tokens)
    eos = "no EOS" if args.no_eos else f"EOS {config.eos_token_id}"
    print(f"{args.family} ({eos}): host {1e3 * (full - one) / (args.new_tokens - 1):.3f} ms a decode step, of which "
          f"the runner {1e6 * runner_clock.seconds / runner_clock.calls:.1f} us ({runner_clock.calls} calls)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        seconds(args.new_tokens)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
