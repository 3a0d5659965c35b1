"""An accelerated model behind Transformers' own front ends: pipeline("text-generation") and the
streamers (TextStreamer prints as tokens come; TextIteratorStreamer hands them to another thread).

    python examples/pipeline_and_streamer.py
    python examples/pipeline_and_streamer.py --model Qwen/Qwen3-30B-A3B --device cuda

Nothing changes on their side: accelerate() patches the model in place, so whatever holds it (a
pipeline, a server, your own generate() call) runs the fused path.
"""

from threading import Thread

import torch
from transformers import TextIteratorStreamer, TextStreamer, pipeline

from _common import PROMPTS, inputs, load, parser
from hf_moe_accel import accelerate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    model, tokenizer = load(args.model, args.device)
    model = accelerate(model)
    greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

    # 1. pipeline: the accelerated model object, as is.
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for prompt in PROMPTS:
        out = generator(prompt, return_full_text=False, **greedy)
        print(f"pipeline: {prompt!r} -> {out[0]['generated_text']!r}")

    batch = inputs(model, tokenizer, PROMPTS[:1])
    with torch.no_grad():
        # 2. TextStreamer: prints the text to stdout as generate() produces it.
        print("TextStreamer: ", end="", flush=True)
        streamed = model.generate(**batch, streamer=TextStreamer(tokenizer, skip_prompt=True), **greedy)

        # 3. TextIteratorStreamer: generate() in a thread, this thread reads the pieces as they come.
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = Thread(target=model.generate, kwargs=dict(**batch, streamer=streamer, **greedy))
        thread.start()
        pieces = list(streamer)  # a server would send each piece as it arrives
        thread.join()
    print(f"TextIteratorStreamer: {len(pieces)} pieces -> {''.join(pieces)!r}")
    text = tokenizer.decode(streamed[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"streamed text equals generate()'s: {''.join(pieces) == text}")


if __name__ == "__main__":
    main()
