"""Quickstart: load a Transformers MoE model, accelerate it, generate, unpatch.

    python examples/quickstart.py                                   # the tiny fixture, or a random tiny model
    python examples/quickstart.py --model Qwen/Qwen3-30B-A3B --device cuda

`accelerate(model)` patches the model in place and returns the same object: every MoE block's router
and experts run through fused kernels (Triton on a GPU, the plain-torch reference path on CPU), and
on a GPU generate() decodes through CUDA graphs. Parameters are shared, never copied. Greedy tokens
equal stock Transformers' (exactly in float32; in bf16 a near-tie may flip). `unpatch(model)` puts
the original modules back.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import TINY, divergence, inputs, load, parser
from hf_moe_accel import accelerate, is_accelerated, patch_report, unpatch


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.model == TINY:
        model, tokenizer = load(TINY, args.device)  # random weights, built in code
    else:
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    batch = inputs(model, tokenizer)
    greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt_len = batch["input_ids"].shape[1]

    with torch.no_grad():
        stock = model.generate(**batch, **greedy)[:, prompt_len:]  # stock Transformers, for comparison

        model = accelerate(model)  # the one line
        report = patch_report(model)
        print(f"accelerated: {is_accelerated(model)}; {len(report.experts)} MoE blocks, "
              f"{len(report.routers)} fused routers; families: {', '.join(sorted(report.families))}")
        ours = model.generate(**batch, **greedy)[:, prompt_len:]

    for row in ours:
        print("generated:", repr(tokenizer.decode(row, skip_special_tokens=True)))
    print(f"tokens equal stock: {torch.equal(ours, stock)}")
    if not torch.equal(ours, stock):
        print(divergence(ours, stock))

    unpatch(model)  # the original modules again; the same parameters
    print(f"after unpatch, accelerated: {is_accelerated(model)}")


if __name__ == "__main__":
    main()
