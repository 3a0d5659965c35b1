"""`hf-moe-accel bench | plan | generate | eval | env` (also `python -m hf_moe_accel ...`)."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata

import torch

from . import eval as eval_cli
from . import plan as plan_cli
from .args import DTYPES as _DTYPES
from .args import Parser, at_least, check_output_paths, in_range, list_of, write_outputs
from .args import int_list as _int_list
from .checkpoint import CliError, load_config, load_model


def _bench(args: argparse.Namespace) -> int:
    from ..bench.ab import (
        CPU_REFERENCE_NOTE,
        STOCK_BASELINES,
        BenchWorkload,
        markdown_table,
        measure_start,
        plot,
        run_ab,
    )
    from ..costmodel.presets import PRESETS

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    # The built-in default: a real-size preset on a GPU, a tiny one a 2-core CPU runs in seconds.
    preset = args.preset or (None if args.model else ("olmoe-1b-7b" if cuda else "tiny-qwen3-moe"))
    # Offload decodes at PCIe/host speed: fewer, shorter runs by default.
    if cuda:
        default_batches, default_new_tokens = ([1, 8, 32], 32) if args.gpu_memory else ([1, 8, 32, 128], 128)
    else:
        default_batches, default_new_tokens = [1, 4], 32
    batches = args.batch or default_batches
    # Shortest first: stock's static cache keeps the longest length it was asked for (run_ab).
    prompt_lens = sorted(args.prompt_len) if args.prompt_len is not None else [128 if cuda else 32]
    new_tokens = args.new_tokens if args.new_tokens is not None else default_new_tokens
    baselines = tuple(args.stock.split(","))
    if preset is not None and preset not in PRESETS:
        raise CliError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if unknown := sorted(set(baselines) - set(STOCK_BASELINES)):
        raise CliError(f"unknown stock baseline(s) {', '.join(unknown)}; choose from {', '.join(STOCK_BASELINES)}")
    if args.compile_decode and (args.no_cuda_graphs or args.gpu_memory):
        raise CliError("--compile-decode compiles the decode step captured in CUDA graphs: it doesn't combine with "
                       "--no-cuda-graphs or --gpu-memory (the offloaded decode step is captured uncompiled)")
    for flag, value in (("--no-zero-copy", args.no_zero_copy), ("--host-dtype", args.host_dtype),
                        ("--miss-drop-threshold", args.miss_drop_threshold)):
        if value not in (None, False) and not args.gpu_memory:
            raise CliError(f"{flag} is an option of expert offload: it needs --gpu-memory")
    if args.gpu_memory:
        if len(prompt_lens) > 1:
            raise CliError("--gpu-memory benchmarks one prompt length; give --prompt-len one value")
        if args.start_time:
            raise CliError("--start-time measures the A/B bench's accelerate(); it doesn't combine with --gpu-memory")
        return _bench_offload(args, preset, dtype, batches, prompt_lens[0], new_tokens)
    options = {"cuda_graphs": not args.no_cuda_graphs}
    if args.compile_decode:
        options["compile_decode"] = True
    if args.top_k is not None:
        options["top_k"] = args.top_k
    if args.threshold is not None:
        options["expert_threshold"] = args.threshold
    workloads = [BenchWorkload(b, p, new_tokens) for p in prompt_lens for b in batches]
    if args.start_probe:
        return _start_probe(args, preset, device, dtype, workloads, options)
    starts = None
    if args.start_time:  # before this process holds a model: each probe builds its own on the same GPU
        print(f"start-up: per workload, two fresh processes one after the other (cold, then warm on the caches the "
              f"first wrote): accelerate() and its first generate(), {2 * len(workloads)} processes")
        starts = measure_start(lambda workload, out: _probe_argv(args, preset, workload, out), workloads, report=print)
    model, name = _bench_model(args, preset, device, dtype)
    print(f"{name} on {device} ({dtype}), prompts {prompt_lens}, {new_tokens} new tokens, batches {batches}, "
          f"stock baselines {', '.join(baselines)}")
    if device.type == "cpu":
        print(CPU_REFERENCE_NOTE)
    results = run_ab(model, name, workloads, repeats=args.repeats, baselines=baselines, stock_passes=args.stock_passes,
                     accelerate_options=options)
    for row, start in zip(results, starts or []):
        row["start"] = start
    print(markdown_table(results))
    write_outputs(args, results, plot)
    return 0


def _bench_model(args: argparse.Namespace, preset: str | None, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """The bench's model and its name: the checkpoint of `--model`, else the preset built with random weights."""
    from ..costmodel.presets import build_preset

    if args.model:
        return load_model(args.model, dtype=dtype, device_map=str(device)), args.model
    if not args.start_probe:
        print(f"building {preset} with random weights on {device} ...")
    return build_preset(preset, device, dtype), preset


def _probe_argv(args: argparse.Namespace, preset: str | None, workload, out: str) -> list[str]:
    """The arguments after `python` of a start-up probe of `workload`: this bench's model, device, dtype
    and accelerate() options, writing its result to `out` (`--start-probe`)."""
    argv = ["-m", "hf_moe_accel", "bench", *(["--model", args.model] if args.model else ["--preset", preset]),
            "--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.no_cuda_graphs:
        argv.append("--no-cuda-graphs")
    if args.compile_decode:
        argv.append("--compile-decode")
    if args.top_k is not None:
        argv += ["--top-k", str(args.top_k)]
    if args.threshold is not None:
        argv += ["--threshold", repr(args.threshold)]
    return argv + ["--batch", str(workload.batch), "--prompt-len", str(workload.prompt_len),
                   "--new-tokens", str(workload.new_tokens), "--start-probe", out]


def _start_probe(args: argparse.Namespace, preset: str | None, device: torch.device, dtype: torch.dtype,
                 workloads: list, options: dict) -> int:
    """`bench --start-probe FILE` (internal: `--start-time` runs it): in this fresh process, build the
    model, then time accelerate() and the first generate() of the one workload; JSON to FILE."""
    import json

    from ..bench.ab import probe_start

    if len(workloads) != 1:
        raise CliError("--start-probe times one workload: give --batch and --prompt-len one value each")
    model, _ = _bench_model(args, preset, device, dtype)
    result = probe_start(model, workloads[0], options)
    with open(args.start_probe, "w") as f:
        json.dump(result, f, indent=2)
    return 0


def _bench_offload(args: argparse.Namespace, preset: str | None, dtype: torch.dtype, batches: list[int],
                   prompt_len: int, new_tokens: int) -> int:
    """`bench --gpu-memory X`: a model larger than the budget, loaded on the host as users load it;
    stock with an offloading device map for the same budget, ours, ours fetch-every-miss."""
    from ..bench.ab import BenchWorkload
    from ..bench.offload import (
        build_preset_on_host,
        markdown_table,
        plot,
        run_offload_bench,
    )
    from ..costmodel.memory import parse_memory_size
    from ..offload.engine import OffloadOptions

    try:  # before a model of tens of GB is built or loaded
        parse_memory_size(args.gpu_memory)
    except (TypeError, ValueError) as error:
        raise CliError(f"--gpu-memory: {error}") from None
    if args.stock_new_tokens < 2:
        raise CliError("--stock-new-tokens must be at least 2 (a first token, then decode)")
    if args.model:
        model = load_model(args.model, dtype=dtype, device_map="cpu")
        name = args.model
    else:
        print(f"building {preset} with random weights in host memory ...")
        model = build_preset_on_host(preset, dtype, pin_experts=False)  # pageable, as from_pretrained leaves it
        name = preset
    print(f"{name} ({dtype}) with a GPU budget of {args.gpu_memory}, prompt {prompt_len}, {new_tokens} new tokens, "
          f"batches {batches}; stock with an offloading device map runs {args.stock_new_tokens} tokens at batch "
          f"{min(batches)} only (it copies the offloaded layers at every step)")
    workloads = [BenchWorkload(b, prompt_len, new_tokens) for b in batches]
    try:
        rows = run_offload_bench(model, name, args.gpu_memory, workloads, repeats=args.repeats,
                                 stock_new_tokens=args.stock_new_tokens, stock_batches=[min(batches)],
                                 options=OffloadOptions(zero_copy=False if args.no_zero_copy else None,
                                                        host_dtype=args.host_dtype,
                                                        miss_drop_threshold=args.miss_drop_threshold))
    except ValueError as error:  # a budget too small, or one that holds the whole model
        raise CliError(str(error)) from None
    print(markdown_table(rows))
    for row in rows:
        if "decode_stats" in row:
            total = row["decode_stats"]["total"]
            print(f"{row['system']}, batch {row['batch']}: decode hit rate {100 * total['hit_rate']:.1f}%, "
                  f"PCIe {total['pcie_bytes'] / 2**20:.1f} MiB, CPU experts {total['cpu_experts']} "
                  f"({total['cpu_expert_s']:.3f} s, calibrated {total['cpu_calibrated_s']:.3f} s), fetched {total['fetched']} "
                  "(per layer: --json)")
    write_outputs(args, rows, plot)
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _env(args: argparse.Namespace) -> int:
    import os

    from .. import __version__, supported_families
    from ..graphs.prefill import ENV_SWITCH as PREFILL_SWITCH
    from ..kernels.pdl import (
        ENV_SWITCH,
        INDUCTOR_SWITCH,
        inductor_pdl_off_reason,
        pdl_off_reason,
    )

    lines = {
        "hf_moe_accel": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "accelerate": _version("accelerate"),
        "CUDA available": str(torch.cuda.is_available()),
        **{name: os.environ.get(name, "unset") for name in ("TRITON_INTERPRET", ENV_SWITCH, INDUCTOR_SWITCH, PREFILL_SWITCH)},
    }
    if torch.cuda.is_available():
        lines["CUDA (torch build)"] = str(torch.version.cuda)
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines[f"GPU {i}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        for key, off_reason, on in (("programmatic dependent launch", pdl_off_reason, "on (decode kernels, GPU 0)"),
                                    ("PDL in compile_decode's inductor kernels", inductor_pdl_off_reason, "on (GPU 0)")):
            try:
                lines[key] = off_reason(torch.device("cuda", 0)) or on
            except ValueError as error:  # a switch set to a value it does not take: the report says so
                lines[key] = f"error: {error}"
    families = supported_families()
    lines["supported families"] = f"{len(families)}: {', '.join(families)}"
    if args.preset or args.model:
        lines.update(_patch_summary(args.preset, args.model))
    width = max(len(k) for k in lines)
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _patch_summary(preset: str | None, model_path: str | None) -> dict[str, str]:
    """What accelerate() patches on a model, from its config alone (built on the meta device: no weights)."""
    from transformers import AutoModelForCausalLM

    from .. import accelerate, patch_report
    from ..costmodel.presets import PRESETS
    from ..graphs.cache_pool import static_cache_blocker
    from ..kernels.decode_linear import DECODE_MAX_ROWS

    if preset is not None and preset not in PRESETS:
        raise CliError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = PRESETS[preset]() if preset else load_config(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    accelerate(model, cuda_graphs=False)
    report = patch_report(model)
    blocker = static_cache_blocker(model.config.get_text_config(decoder=True))
    return {
        "model": f"{preset or model_path} ({type(model).__name__})",
        "families patched": ", ".join(sorted(report.families)),
        "MoE blocks patched": str(len(report.experts)),
        "routers fused": f"{len(report.routers)} of {len(report.experts)}",
        "RMSNorms fused": "checked when the weights are loaded (each norm is verified against the kernel's formula)",
        "decode attention": _decode_attention_summary(report.decode_attention),
        "attention projections": f"{len(report.projections)} attention modules: q/k/v in one launch at up to "
                                 f"{DECODE_MAX_ROWS} tokens (CUDA)" if report.projections else "as Transformers runs them",
        "CUDA-graph decode": _graph_decode_summary(blocker),
    }


def _graph_decode_summary(blocker: str | None) -> str:
    """Whether generate() would decode this model through CUDA graphs; graphs need CUDA, so a machine
    without it is told so before what the model itself allows."""
    on_cuda = "served (greedy and sampling)" if blocker is None else f"eager: {blocker}"
    if torch.cuda.is_available():
        return on_cuda
    return f"needs CUDA, none here (decode runs eagerly on the plain-torch reference path); on a CUDA machine: {on_cuda}"


def _decode_attention_summary(switched: bool) -> str:
    from ..patches.attention import UNGROUPED_KERNEL_MAX_KEYS

    if switched:
        return ("one-token queries on the Triton decode kernel (CUDA; grouped heads, or batch x cache length <= "
                f"{UNGROUPED_KERNEL_MAX_KEYS}), else grouped heads folded onto their KV head (no repeat_kv copies)")
    return "as Transformers runs it (not the sdpa implementation)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hf-moe-accel", description="Fast MoE inference for Hugging Face Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="A/B decode benchmark against stock Transformers (default: built-in model)")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--preset", help="random-weight model shape (default: olmoe-1b-7b on a GPU, tiny-qwen3-moe on CPU)")
    source.add_argument("--model", help="path of a local Hugging Face checkpoint")
    bench.add_argument("--batch", type=_int_list, help="comma-separated batch sizes (default 1,8,32,128 on a GPU, 1,8,32 with --gpu-memory, 1,4 on CPU)")
    bench.add_argument("--prompt-len", type=list_of(at_least(1)),
                       help="comma-separated prompt lengths in tokens, each 1 or more, run shortest first "
                            "(default 128 on a GPU, 32 on CPU; one value with --gpu-memory)")
    bench.add_argument("--new-tokens", type=at_least(2, "a first token, then at least one timed decode step"),
                       help="new tokens, forced, 2 or more (default 128 on a GPU, 32 with --gpu-memory or on CPU)")
    bench.add_argument("--repeats", type=at_least(1), default=3, help="timed repeats per run, 1 or more; the median is reported")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), help="default bfloat16 on a GPU, float32 on CPU")
    bench.add_argument("--device", choices=["auto", "cpu"], default="auto")
    bench.add_argument("--stock", default="default,static",
                       help="stock baselines: default (its default experts implementation), static (static cache, compiled on a GPU)")
    bench.add_argument("--stock-passes", type=int, choices=[1, 2], default=2,
                       help="time stock before ours only (1) or before and after (2, the protocol's default)")
    bench.add_argument("--no-cuda-graphs", action="store_true", help="ours without CUDA-graph decode (accelerate(cuda_graphs=False))")
    bench.add_argument("--compile-decode", action="store_true",
                       help="ours with the decode step compiled by torch.compile inside its CUDA graphs (accelerate(compile_decode=True))")
    bench.add_argument("--top-k", type=at_least(1), help="ours with this many experts per token (accelerate(top_k=...))")
    bench.add_argument("--threshold", type=in_range(0.0, 1.0, high_open=True),
                       help="ours with this expert threshold in [0, 1) (accelerate(expert_threshold=...))")
    bench.add_argument("--gpu-memory", help="GPU budget (e.g. 16GiB) for a model larger than it: ours with CPU expert "
                       "offload against stock with an offloading device map and our own fetch-every-miss policy")
    bench.add_argument("--no-zero-copy", action="store_true",
                       help="with --gpu-memory: ours without zero-copy decode (OffloadOptions(zero_copy=False)): every "
                            "decode step runs the expert cache's host round trip, eagerly")
    bench.add_argument("--host-dtype", choices=["int4"],
                       help="with --gpu-memory: misses computed on the CPU read group-wise int4 host copies "
                            "(OffloadOptions(host_dtype='int4'); lossy; zero-copy off)")
    bench.add_argument("--miss-drop-threshold", type=in_range(0.0, 1.0, high_open=True),
                       help="with --gpu-memory: drop a missed expert whose normalised routing weight is under this "
                            "(OffloadOptions(miss_drop_threshold=...); lossy)")
    bench.add_argument("--stock-new-tokens", type=int, default=3,
                       help="with --gpu-memory: tokens stock's offloading device map decodes (seconds each on real shapes)")
    bench.add_argument("--start-time", action="store_true",
                       help="also time ours' start-up per workload: accelerate() and its first generate() in a fresh "
                            "process with empty on-disk compile caches (cold), then in a second one that finds them (warm)")
    bench.add_argument("--start-probe", help=argparse.SUPPRESS)  # internal: one process of --start-time, JSON to this file
    bench.add_argument("--json", help="write the per-run results (stock, ours, speedup) to this JSON file")
    bench.add_argument("--plot", help="write bar charts of decode tokens/s, time to first token and prefill tokens/s "
                                      "to this PNG file (needs matplotlib)")
    bench.set_defaults(run=_bench)

    eval_cli.add_parser(sub)
    plan_cli.add_parsers(sub)

    env = sub.add_parser("env", help="print versions and hardware for a bug report")
    target = env.add_mutually_exclusive_group()
    target.add_argument("--preset", help="also say what accelerate() patches on this preset (from its config, no weights)")
    target.add_argument("--model", help="also say what accelerate() patches on this checkpoint (reads its config only)")
    env.set_defaults(run=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0, or 2 for a bad input (one line on stderr saying
    what and how to fix it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's refusal (already printed) or --help: a status, as every command returns
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        check_output_paths(args)
        return args.run(args)
    except CliError as error:
        print(f"hf-moe-accel {args.command}: {error}", file=sys.stderr)
        return 2
