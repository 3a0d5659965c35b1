"""`hf-moe-accel eval`: perplexity, greedy agreement, experts per token and decode speed of a local
checkpoint for each static top-k and expert threshold, beside the full model; with `--expert-dtype`,
the full model with its experts quantized at patch time too; with `--gpu-memory`, the expert offload
under one simulated cache, and its lossy options (`--host-dtype`, `--miss-drop-threshold`) under the
same cache (`bench.quality_offload`)."""

from __future__ import annotations

import argparse

import torch

from .args import DTYPES as _DTYPES
from .args import add_expert_dtype, at_least, in_range, list_of, write_outputs
from .checkpoint import CliError, check_checkpoint, load_model, load_tokenizer


def _numbers(kind: type, text: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="quality (perplexity, greedy agreement) and speed with fewer activated experts",
        description="Measure each setting (stock, full, each --top-k, each --threshold) on the same weights and text.",
    )
    parser.add_argument("--model", required=True, help="path of a local Hugging Face MoE checkpoint (with its tokenizer)")
    parser.add_argument("--text", required=True, help="UTF-8 text file for perplexity and prompts (held-out text)")
    parser.add_argument("--top-k", type=lambda t: _numbers(int, t), default=[],
                        help="comma-separated static top-k values, e.g. 3,2,1")
    parser.add_argument("--threshold", type=lambda t: _numbers(float, t), default=[],
                        help="comma-separated expert thresholds in [0, 1), e.g. 0.05,0.1,0.2")
    parser.add_argument("--window", type=at_least(1), default=256,
                        help="perplexity window in tokens, 1 or more (non-overlapping; default 256)")
    parser.add_argument("--max-tokens", type=at_least(1),
                        help="perplexity over the text's first N tokens only, at least one window (default: all)")
    parser.add_argument("--batch", type=at_least(1), default=8, help="windows per forward pass, 1 or more (default 8)")
    parser.add_argument("--prompts", type=at_least(1), default=16, help="prompts for greedy agreement, 1 or more (default 16)")
    parser.add_argument("--prompt-len", type=at_least(1), default=64, help="tokens per prompt, 1 or more (default 64)")
    parser.add_argument("--new-tokens", type=at_least(1), default=32,
                        help="greedy tokens per prompt, 1 or more; 2 or more with a decode-speed run (default 32)")
    parser.add_argument("--speed-batch", type=at_least(0),
                        help="batch of the decode-speed run; 0 skips it (default 32 on a GPU, 0 on CPU, where the "
                             "reference path's speed says nothing about the kernels')")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="default bfloat16 on a GPU, float32 on CPU")
    add_expert_dtype(parser, help="also measure the full model with its experts quantized at patch time to this dtype "
                                  "(accelerate(expert_dtype=...)): one more row, named after it, beside 'full' in --dtype")
    offload = parser.add_argument_group(
        "offload", "rows of the expert offload under one cache, simulated from the model's routing (slots filled by "
                   "prefetch, every miss served from host memory on the CPU): 'offload', then one per lossy option")
    offload.add_argument("--gpu-memory", help="the offload's GPU budget, e.g. 16GiB: adds the 'offload' row")
    offload.add_argument("--offload-slots", type=at_least(1),
                         help="expert slots per layer, fewer than the budget holds (a budget holding every expert offloads nothing)")
    offload.add_argument("--host-dtype", choices=["int4"],
                         help="adds a row with misses read from group-wise int4 host copies (OffloadOptions.host_dtype)")
    offload.add_argument("--miss-drop-threshold", type=list_of(in_range(0, 1, high_open=True)), default=[],
                         help="comma-separated thresholds in [0, 1): a row each with missed experts under it dropped per "
                              "token (OffloadOptions.miss_drop_threshold)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write a plot of quality against decode speed to this PNG file")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..bench.quality import EvalConfig, evaluate, sweep_settings
    from ..bench.quality_offload import check_offload_eval, offload_rows
    from ..bench.quality_report import markdown_table, plot

    cuda = torch.cuda.is_available() and args.device != "cpu"
    speed_batch = args.speed_batch if args.speed_batch is not None else (32 if cuda else 0)
    try:
        settings = sweep_settings(args.top_k, args.threshold, args.expert_dtype)
        config = EvalConfig(
            window=args.window, max_tokens=args.max_tokens, batch=args.batch, prompts=args.prompts,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, speed_batch=speed_batch,
        )
        offload = _offload_eval(args)
        if speed_batch and args.new_tokens < 2:
            raise ValueError("a decode-speed run (--speed-batch > 0) times decode steps: --new-tokens must be 2 or more")
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise CliError(f"--text {args.text}: can't read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise CliError(f"--text {args.text} is not UTF-8 text (byte {error.start}); give a UTF-8 text file") from None
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from None
    check_checkpoint(args.model, tokenizer=True)  # before either loads: one line naming what's wrong
    device = "cuda" if cuda else "cpu"
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device_map=device)
    token_ids = tokenizer(text, return_tensors="pt").input_ids[0]
    try:
        if offload is not None:
            check_offload_eval(model, offload)
        result = evaluate(model, token_ids, settings, config)
        if offload is not None:
            full = next(row for row in result["settings"] if row["name"] == "full")
            result["settings"].extend(offload_rows(model, token_ids, config, offload, full))
    except ValueError as error:  # e.g. a top-k above the model's number of experts
        raise CliError(str(error)) from None
    result = {"model": args.model, "text": args.text, **result}
    print(markdown_table(result))
    write_outputs(args, result, plot)
    return 0


def _offload_eval(args: argparse.Namespace):
    """The offload rows' settings (`bench.quality_offload.OffloadEval`), or None without --gpu-memory;
    raises ValueError for a bad combination or budget."""
    from ..bench.quality_offload import OffloadEval
    from ..costmodel.memory import parse_memory_size

    if not args.gpu_memory:
        if args.host_dtype or args.miss_drop_threshold or args.offload_slots:
            raise ValueError("--offload-slots, --host-dtype and --miss-drop-threshold measure the expert offload: they need --gpu-memory")
        return None
    parse_memory_size(args.gpu_memory)
    return OffloadEval(gpu_memory=args.gpu_memory, slots_per_layer=args.offload_slots, host_dtype=args.host_dtype,
                miss_drop_thresholds=tuple(args.miss_drop_threshold))

