"""A/B against stock Transformers in your own script: time generate() on the stock model, then
accelerate the same model object and time it again on the same prompts; compare tokens/s and tokens.

    python examples/ab_against_stock.py
    python examples/ab_against_stock.py --model Qwen/Qwen3-30B-A3B --device cuda --new-tokens 128

Method: one warm-up call first (on a GPU it also captures the decode CUDA graphs), then the median
of --repeats timed calls, synchronised. Stock runs first, on the same weights. On CPU, accelerate()
runs the plain-torch reference path: the numbers check the mechanics, they are not a speed claim
(`python -m hf_moe_accel bench` is the project's measured A/B on a GPU).
"""

import statistics
import time

import torch

from _common import PROMPTS, divergence, inputs, load, parser
from hf_moe_accel import accelerate


def timed_generate(model, batch, repeats: int, **kwargs) -> tuple[float, torch.Tensor]:
    """(median seconds of `repeats` generate() calls after one warm-up, the generated tokens)."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            sync()
            if i:  # call 0 is the warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times), out[:, batch["input_ids"].shape[1]:]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model, tokenizer = load(args.model, args.device)
    batch = inputs(model, tokenizer, PROMPTS)
    generated = len(PROMPTS) * args.new_tokens
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    stock_s, stock_tokens = timed_generate(model, batch, args.repeats, **greedy)
    accelerate(model)
    ours_s, our_tokens = timed_generate(model, batch, args.repeats, **greedy)

    print(f"batch {len(PROMPTS)}, {args.new_tokens} new tokens, median of {args.repeats} after a warm-up, on {model.device}")
    print(f"stock:       {generated / stock_s:10.1f} tokens/s ({stock_s * 1e3:.1f} ms a call)")
    print(f"accelerated: {generated / ours_s:10.1f} tokens/s ({ours_s * 1e3:.1f} ms a call), {stock_s / ours_s:.2f}x stock")
    print(f"tokens equal stock: {torch.equal(our_tokens, stock_tokens)}")
    if not torch.equal(our_tokens, stock_tokens):
        print(divergence(our_tokens, stock_tokens))
    if model.device.type == "cpu":
        print("note: on CPU accelerate() runs the plain-torch reference path; these timings are not a speed "
              "claim. Run with --device cuda on a GPU for the fused kernels and CUDA graphs.")


if __name__ == "__main__":
    main()
