"""A model larger than the GPU: `accelerate(model, gpu_memory="24GiB")` keeps the non-expert weights,
the KV cache and a cache of expert slots on the GPU, and every expert in pinned host memory; an
expert missing from its layer's slots runs on the CPU or is fetched, whichever the measured cost
model says is sooner. Load the model on the CPU (device_map="cpu"): it never has to fit the GPU.

    python examples/larger_than_gpu.py --model Qwen/Qwen3-30B-A3B --gpu-memory 16GiB --slots-per-layer auto
    python examples/larger_than_gpu.py                   # tiny model: a quarter of each layer's experts cached

Without CUDA the CPU stands in for the GPU side (OffloadOptions(device="cpu")): slots are CPU
tensors and copies plain copies, so the cache, eviction, miss routing and statistics run the same
code, with no speed-up. offload_stats(model) gives the hit rate, fetches, CPU experts and bytes.
"""

import torch

from _common import divergence, inputs, load, parser
from hf_moe_accel import OffloadOptions, accelerate, offload_stats, unpatch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--gpu-memory", default="1GiB", help="GPU budget, e.g. 16GiB (default: %(default)s)")
    p.add_argument("--slots-per-layer", default="quarter",
                   help="'auto' (as many as the budget holds), 'quarter' (a quarter of each layer's experts, so that "
                        "a model that fits still shows the cache at work; default) or a number")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    if args.device == "cpu":
        print("no CUDA device asked for: the CPU stands in for the GPU side (same code paths, no speed-up)")
    model, tokenizer = load(args.model, args.device, device_map="cpu")  # the whole model in host memory

    num_experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    named = {"auto": None, "quarter": max(1, num_experts // 4)}
    slots = named[args.slots_per_layer] if args.slots_per_layer in named else int(args.slots_per_layer)
    options = OffloadOptions(device=args.device, slots_per_layer=slots)  # defaults suit most uses; see its docstring
    batch = inputs(model, tokenizer)
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        stock = model.generate(**batch, **greedy)  # stock, on the CPU

        accelerate(model, gpu_memory=args.gpu_memory, offload=options)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        ours = model.generate(**batch, **greedy)

    cached = f"{slots} of {num_experts}" if slots is not None else f"as many of {num_experts} as fit"
    print(f"gpu_memory={args.gpu_memory}: {cached} experts cached per layer, on {args.device}")
    print(f"generated: {tokenizer.decode(ours[0, batch['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    print(f"tokens equal stock: {torch.equal(ours.cpu(), stock)}")
    if not torch.equal(ours.cpu(), stock):
        print(divergence(ours, stock))
    try:  # counters since accelerate() (reset_offload_stats(model) zeroes them, e.g. after a warm-up)
        for phase in ("prefill", "decode"):
            print("offload_stats", offload_stats(model, phase).summary())
    except ValueError:  # the budget held every expert: accelerate() placed the whole model, no offload
        print(f"the whole model fits in {args.gpu_memory}: placed on {args.device} without expert offload")
    unpatch(model)  # every weight back on the CPU


if __name__ == "__main__":
    main()
