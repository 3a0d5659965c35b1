"""Fewer experts per token for speed, and what it costs in quality: `accelerate(model, top_k=2)`
runs each token through its 2 best-routed experts instead of the model's own top-k;
`expert_threshold=0.2` drops, per token, the experts whose routing weight is under 20% (the best
one always stays). This script measures held-out perplexity for the full model and each setting;
`python -m hf_moe_accel eval` (printed at the end; --eval runs it) adds greedy agreement with stock
and, on a GPU, decode speed.

    python examples/fewer_experts.py
    python examples/fewer_experts.py --model Qwen/Qwen3-30B-A3B --device cuda --text heldout.txt --top-k 6,4
"""

import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from _common import TINY, load, parser
from hf_moe_accel import accelerate, unpatch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 256) -> float:
    """Perplexity over non-overlapping windows of `ids`."""
    windows = ids[: len(ids) // window * window].view(-1, window).to(model.device)
    loss = model(windows, labels=windows).loss  # mean next-token cross-entropy
    return math.exp(loss.item())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--text", help="held-out text (default: heldout.txt beside the model, else a Python stdlib source file)")
    p.add_argument("--top-k", help="comma-separated top-k values (default: half the model's, and 1)")
    p.add_argument("--threshold", default="0.2", help="comma-separated expert thresholds in [0, 1) (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=2048, help="perplexity over the text's first N tokens")
    p.add_argument("--eval", action="store_true", help="also run the eval command (a checkpoint folder with a tokenizer)")
    args = p.parse_args()
    heldout = Path(args.model, "heldout.txt")
    text = Path(args.text) if args.text else heldout if heldout.exists() else Path(shlex.__file__)
    model, tokenizer = load(args.model, args.device)
    own = model.config.num_experts_per_tok
    args.top_k = args.top_k or ",".join(str(k) for k in sorted({own // 2, 1} - {0}, reverse=True))
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[0][: args.max_tokens]

    settings = [("full", {})] + [(f"top_k={k}", {"top_k": int(k)}) for k in args.top_k.split(",") if k]
    settings += [(f"threshold={t}", {"expert_threshold": float(t)}) for t in args.threshold.split(",") if t]
    print(f"held-out perplexity over {len(ids)} tokens of {text.name} (model's top-k: {own})")
    full = None
    for label, options in settings:
        accelerate(model, **options)
        ppl = perplexity(model, ids)
        unpatch(model)  # options apply per accelerate() call: unpatch before the next setting
        full = full or ppl
        print(f"  {label:15s} perplexity {ppl:9.3f}  ({100 * (ppl / full - 1):+.2f}% vs full)")
    if args.model == TINY:  # (and the eval command loads a checkpoint folder with its tokenizer)
        print("  (random weights: these numbers show the mechanics, not a model's quality cost)")
        return

    command = [sys.executable, "-m", "hf_moe_accel", "eval", "--model", args.model, "--text", str(text), "--top-k", args.top_k,
               "--threshold", args.threshold, "--max-tokens", str(args.max_tokens), "--prompts", "4", "--new-tokens", "8"]
    print("the full report (perplexity, greedy agreement, speed on a GPU): python", shlex.join(command[1:]))
    if args.eval:
        sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
