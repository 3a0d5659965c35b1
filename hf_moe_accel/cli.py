"""`hf-moe-accel bench | env` (also `python -m hf_moe_accel ...`)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

import torch


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _bench(args: argparse.Namespace) -> int:
    from .bench.ab import Workload, markdown_table, run_ab
    from .bench.presets import PRESETS, build_preset

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    # The built-in default: a real-size preset on a GPU, a tiny one a 2-core CPU runs in seconds.
    preset = args.preset or (None if args.model else ("olmoe-1b-7b" if cuda else "tiny-qwen3-moe"))
    batches = args.batch or ([1, 8, 32] if cuda else [1, 4])
    prompt_len = args.prompt_len or (128 if cuda else 32)
    new_tokens = args.new_tokens or (128 if cuda else 32)
    if preset is not None and preset not in PRESETS:
        print(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=str(device)).eval()
        name = args.model
    else:
        model = build_preset(preset, device, dtype)
        name = preset
    print(f"{name} on {device} ({dtype}), prompt {prompt_len}, {new_tokens} new tokens, batches {batches}")
    workloads = [Workload(b, prompt_len, new_tokens) for b in batches]
    results = run_ab(model, name, workloads, repeats=args.repeats)
    print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _env(_: argparse.Namespace) -> int:
    import os

    from . import __version__, supported_families

    lines = {
        "hf_moe_accel": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "accelerate": _version("accelerate"),
        "CUDA available": str(torch.cuda.is_available()),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset"),
    }
    if torch.cuda.is_available():
        lines["CUDA (torch build)"] = str(torch.version.cuda)
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines[f"GPU {i}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    families = supported_families()
    lines["supported families"] = f"{len(families)}: {', '.join(families)}"
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe-accel", description="Fast MoE inference for Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="A/B decode benchmark against stock Transformers (default: built-in model)")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--preset", help="random-weight model shape (default: olmoe-1b-7b on a GPU, tiny-qwen3-moe on CPU)")
    source.add_argument("--model", help="path of a local Hugging Face checkpoint")
    bench.add_argument("--batch", type=_int_list, help="comma-separated batch sizes")
    bench.add_argument("--prompt-len", type=int, help="prompt tokens (default 128 on a GPU, 32 on CPU)")
    bench.add_argument("--new-tokens", type=int, help="new tokens, forced (default 128 on a GPU, 32 on CPU)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per run; the median is reported")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default bfloat16 on a GPU, float32 on CPU")
    bench.add_argument("--device", choices=["auto", "cpu"], default="auto")
    bench.add_argument("--json", help="write the per-run results to this JSON file")
    bench.set_defaults(run=_bench)

    env = sub.add_parser("env", help="print versions and hardware for a bug report")
    env.set_defaults(run=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
