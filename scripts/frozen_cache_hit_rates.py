"""What zero-copy decode gives up on trained routing: decode hit rates of the expert cache adapting
during decode against the same cache frozen as prefill left it (zero-copy decode never changes the
slots). CPU, a fixture, batch 1, greedy; both counted per routed (token, expert) pair on one decode.

    python scripts/frozen_cache_hit_rates.py --fixture ../shared/fixtures/tiny-qwen3-moe --new-tokens 64,512

"Adaptive" is the expert cache with zero miss costs (every miss fetched, prefetch never throttled by
time: `bench_offload.py --simulate`'s setting), the most it adapts; "frozen" reads, at each decode
step, the slot table the prompt's forward left.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_accel import OffloadOptions, accelerate, unpatch
from hf_moe_accel.offload.engine import offload_engine
from hf_moe_accel.offload.miss_cost import MissCostModel


def hit_rates(model, prompt: torch.Tensor, slots: int, new_tokens: int) -> tuple[float, float]:
    """(adaptive, frozen) decode hit rates per routed pair."""
    options = OffloadOptions(device="cpu", slots_per_layer=slots, zero_copy=False, cost_model=MissCostModel(0.0, 0.0, 0.0))
    accelerate(model, gpu_memory="8GiB", offload=options)
    layers = offload_engine(model).layers
    modules = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "gate_up_proj")]
    after_prefill: dict[int, torch.Tensor] = {}
    counts = {"pairs": 0, "adaptive": 0, "frozen": 0}

    def before(layer):
        def hook(_module, args):
            ids = args[1]
            if ids.shape[0] == 1:  # a decode step (batch 1)
                counts["pairs"] += ids.numel()
                counts["adaptive"] += int((layer.cache.slot_of_expert[ids] >= 0).sum())
                counts["frozen"] += int((after_prefill[layer.index][ids] >= 0).sum())
        return hook

    def after(layer):
        def hook(_module, args, _output):
            if args[1].shape[0] > 1:  # the prompt's forward: the slots zero-copy decode would keep
                after_prefill[layer.index] = layer.cache.slot_of_expert.clone()
        return hook

    handles = [h for m, layer in zip(modules, layers)
               for h in (m.register_forward_pre_hook(before(layer)), m.register_forward_hook(after(layer)))]
    try:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
        unpatch(model)
    return counts["adaptive"] / counts["pairs"], counts["frozen"] / counts["pairs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", type=Path, required=True)
    parser.add_argument("--new-tokens", default="64,512")
    parser.add_argument("--cached", default="0.25,0.5", help="shares of each layer's experts in slots")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.fixture, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.fixture)
    prompt = tokenizer((args.fixture / "heldout.txt").read_text()[:4000], return_tensors="pt").input_ids[:, :128]
    experts = model.config.get_text_config().num_local_experts
    print("| fixture | experts cached | new tokens | adaptive hit rate | frozen after prefill |")
    print("|---|---|---|---|---|")
    for share in map(float, args.cached.split(",")):
        for new_tokens in map(int, args.new_tokens.split(",")):
            adaptive, frozen = hit_rates(model, prompt, int(experts * share), new_tokens)
            print(f"| {args.fixture.name} | {share:.0%} | {new_tokens} | {100 * adaptive:.1f}% | {100 * frozen:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
