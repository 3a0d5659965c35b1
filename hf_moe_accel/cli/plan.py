"""`hf-moe-accel plan` (ranked placements with predicted figures) and `hf-moe-accel generate`
(text from a checkpoint, in one process or under torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import torch

from ..costmodel.hardware import GIB, Hardware, preset_names, resolve_hardware
from ..costmodel.memory import parse_memory_size
from ..costmodel.predictor import PLAN_KINDS, Prediction, Workload
from ..parallel.loading import LOADING_KINDS, join_process_group, load_for_rank
from .args import DTYPES as _DTYPES
from .args import at_least, in_range, non_empty
from .args import int_list as _int_list
from .checkpoint import CliError, check_checkpoint, load_model, load_tokenizer


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k for k in text.split(",") if k)
    unknown = sorted(set(kinds) - set(PLAN_KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown plan(s) {', '.join(unknown) or text!r}; plans: {', '.join(PLAN_KINDS)}")
    return kinds


def _expert_dtype(text: str) -> str:
    if text != "fp8":
        raise argparse.ArgumentTypeError(
            f"unknown expert dtype {text!r}; the one choice is 'fp8' (block-scaled float8 experts); leave it out for --dtype experts")
    return text


def _gib(text: str) -> float:
    try:
        return parse_memory_size(text) / GIB
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="rank the ways to place a model on GPUs, with predicted tokens/s and memory")
    plan.add_argument("--model", required=True, help="a preset shape (e.g. qwen3-235b-a22b) or a checkpoint folder (its config only)")
    plan.add_argument("--hardware", help=f"stated hardware: a preset ({', '.join(preset_names())}) or a JSON file; default: calibrate this machine")
    plan.add_argument("--gpus", type=at_least(1), help="GPUs to plan for, 1 or more (default: all of the hardware's)")
    plan.add_argument("--gpu-memory", type=_gib, help="memory per GPU to plan with, e.g. 24GiB (default: the GPU's)")
    plan.add_argument("--batch", type=_int_list, default=[1], help="comma-separated batch sizes (default 1)")
    plan.add_argument("--prompt-len", type=at_least(1), default=128, help="prompt tokens, 1 or more (default 128)")
    plan.add_argument("--new-tokens", type=at_least(1), default=128,
                      help="new tokens, 1 or more; 2 or more with --measure (default 128)")
    plan.add_argument("--hit-rate", type=in_range(0.0, 1.0),
                      help="expert-cache hit rate in [0, 1] for the offload plan (default: uniform routing)")
    plan.add_argument("--plans", type=_kinds, help=f"only these plans, comma-separated ({', '.join(PLAN_KINDS)})")
    plan.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    plan.add_argument("--expert-dtype", type=_expert_dtype,
                      help="fp8: count the routed experts as block-scaled FP8 (1 byte per weight + a float32 scale per "
                           "128x128 block), as accelerate(expert_dtype='fp8') stores them; the rest stays in --dtype")
    plan.add_argument("--fp8-attention", action="store_true",
                      help="with --expert-dtype fp8: the attention projections in FP8 too, as FP8 checkpoints store them")
    plan.add_argument("--calibrate", action="store_true", help="re-measure this machine (otherwise the cached calibration is used)")
    plan.add_argument("--measure", action="store_true", help="also run each feasible plan briefly here and print measured beside predicted")
    plan.add_argument("--repeats", type=at_least(1), default=1, help="timed repeats per measured plan, 1 or more (--measure)")
    plan.add_argument("--json", help="write the predictions (and measurements) to this JSON file")
    plan.set_defaults(run=run_plan)

    gen = sub.add_parser("generate", help="greedy text from a checkpoint; runs under torchrun for ep/tp/dp")
    gen.add_argument("--model", required=True, help="a Hugging Face checkpoint folder")
    gen.add_argument("--prompt", action="append", required=True, type=non_empty, help="a prompt, not empty (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=at_least(1), default=64, help="new tokens, 1 or more (default 64)")
    gen.add_argument("--parallel", choices=["auto", "single", "pp", "ep", "tp", "dp"], default="auto",
                     help="the plan (default auto: the predictor's pick; under torchrun ep/tp/dp)")
    gen.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu runs on the CPU (gloo under torchrun)")
    gen.add_argument("--dtype", choices=sorted(_DTYPES), help="default bfloat16 on GPUs, float32 on the CPU")
    gen.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly")
    gen.set_defaults(run=run_generate)


# ---- plan ------------------------------------------------------------------------------------


def _hardware(args: argparse.Namespace) -> Hardware:
    if args.hardware:
        hardware = resolve_hardware(args.hardware)
        if args.gpus:
            hardware = hardware.with_gpus(args.gpus)
    else:
        from ..bench.calibrate import calibrate

        if not torch.cuda.is_available():
            raise ValueError(f"no CUDA GPU here to calibrate: pass --hardware (a preset: {', '.join(preset_names())}, or a JSON file)")
        if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            torch.distributed.barrier()  # rank 0 measures alone, the others read its cache file
            hardware = calibrate()
        else:
            hardware = calibrate(refresh=args.calibrate)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        if args.gpus and args.gpus > hardware.gpu_count:
            raise ValueError(f"this machine has {hardware.gpu_count} GPU(s), --gpus asks {args.gpus}; plan for another machine with --hardware")
        if args.gpus:
            hardware = hardware.with_gpus(args.gpus)
    return hardware.with_gpu_memory(args.gpu_memory) if args.gpu_memory else hardware


def run_plan(args: argparse.Namespace) -> int:
    distributed = args.measure and _init_distributed(on_cpu=not torch.cuda.is_available())
    try:
        return _plan(args)
    except ValueError as error:
        print(f"hf-moe-accel plan: {error}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _plan(args: argparse.Namespace) -> int:
    from ..costmodel.presets import PRESETS
    from ..costmodel.ranking import candidate_plans, format_table, rank_plans
    from ..costmodel.shapes import load_shape, with_fp8

    if args.measure and args.new_tokens < 2:
        raise CliError("--measure times decode steps: --new-tokens must be 2 or more (a first token, then decode)")
    if args.model not in PRESETS and os.path.isdir(args.model):
        check_checkpoint(args.model, weights=args.measure)  # --measure loads the weights
    if args.fp8_attention and args.expert_dtype != "fp8":
        raise CliError("--fp8-attention counts attention in FP8 beside FP8 experts: add --expert-dtype fp8")
    hardware = _hardware(args)
    try:
        shape = load_shape(args.model, _DTYPES[args.dtype])
    except OSError as error:  # Transformers' config reader: a checkpoint folder it can't read
        raise CliError(f"--model {args.model}: can't read its config ({' '.join(str(error).split())})") from None
    if args.expert_dtype == "fp8":
        shape = with_fp8(shape, attention=args.fp8_attention)
    workloads = [Workload(b, args.prompt_len, args.new_tokens, args.hit_rate) for b in args.batch]
    say = print if _is_rank_zero() else (lambda *_: None)  # under torchrun, rank 0 speaks
    say(shape.summary())
    say(f"hardware: {hardware.describe()}")
    report = {"model": dataclasses.asdict(shape), "hardware": hardware.to_json(), "workloads": []}
    measurer = None
    for workload in workloads:
        ranked = rank_plans(shape, hardware, workload, candidate_plans(hardware, args.plans))
        say(f"\nbatch {workload.batch}, prompt {workload.prompt_len}, {workload.new_tokens} new tokens:")
        say(format_table(ranked))
        entry = {**workload.__dict__, "predictions": [p.as_dict() for p in ranked]}
        if args.measure:
            from ..bench.plan_check import PlanMeasurer

            measurer = measurer or PlanMeasurer(args.model, _DTYPES[args.dtype])
            entry["measured"] = _measure_all(measurer, ranked, workload, hardware, args.repeats, say)
        report["workloads"].append(entry)
    if args.json and _is_rank_zero():
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        say(f"\nwrote {args.json}")
    return 0


def _measure_all(measurer, ranked: list[Prediction], workload: Workload, hardware: Hardware, repeats: int, say) -> list[dict]:
    from ..bench.plan_check import why_not_measurable

    rows = []
    say("\nmeasured here:")
    say("| plan | predicted tok/s | measured tok/s | measured / predicted | predicted TTFT ms | measured TTFT ms |")
    say("|---|---|---|---|---|---|")
    for prediction in ranked:
        if not prediction.feasible:
            continue
        reason = why_not_measurable(prediction.plan)
        row = {"plan": prediction.plan.label, "predicted": prediction.as_dict()}
        if reason is None:
            measured = measurer.measure(prediction.plan, workload, repeats, gpu_memory_gib=hardware.gpu_memory_gib)
            row["measured"] = measured
            ratio = measured["decode_tokens_per_s"] / prediction.decode_tokens_per_s
            cells = [f"{measured['decode_tokens_per_s']:,.1f}", f"{ratio:.2f}", f"{1e3 * measured['ttft_s']:,.0f}"]
        else:
            row["not_measured"] = reason
            cells = [reason, "-", "-"]
        say(f"| {prediction.plan.label} | {prediction.decode_tokens_per_s:,.1f} | {cells[0]} | {cells[1]} | {prediction.ttft_ms:,.0f} | {cells[2]} |")
        rows.append(row)
    return rows


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _init_distributed(on_cpu: bool) -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the process group (gloo on the CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # with a timeout on every collective: a rank whose peer died raises instead of waiting for ever
    join_process_group(torch.device("cpu") if on_cpu else None)
    return dist.is_initialized()


# ---- generate --------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..api import accelerate

    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    distributed = _init_distributed(on_cpu)
    logging.basicConfig(level=logging.WARNING)
    try:
        dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if on_cpu else torch.bfloat16)
        check_checkpoint(args.model, tokenizer=True)  # before either loads: one line naming what's wrong
        tokenizer = load_tokenizer(args.model)
        tokenizer.padding_side = "left"
        if distributed and args.parallel in LOADING_KINDS:  # each rank reads only the tensors it keeps
            model = load_for_rank(args.model, args.parallel, dtype=dtype, device="cpu" if on_cpu else None)
        else:
            model = load_model(args.model, dtype=dtype)
        if distributed or not on_cpu:
            accelerate(model, devices="cpu" if on_cpu else "auto", parallel=args.parallel, cuda_graphs=not args.no_cuda_graphs)
        else:
            if args.parallel not in ("auto", "single"):
                raise ValueError(f"--parallel {args.parallel} needs GPUs or torchrun; on one CPU process the model runs whole")
            accelerate(model, cuda_graphs=False)
        prompts = args.prompt
        if args.parallel == "dp" and distributed:  # each replica serves its share of the prompts
            prompts = prompts[dist.get_rank() :: dist.get_world_size()]
        texts = _generate_texts(model, tokenizer, prompts, args.max_new_tokens) if prompts else []
        if args.parallel == "dp" and distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, texts)
            texts = [gathered[i % len(gathered)][i // len(gathered)] for i in range(len(args.prompt))]
        if not distributed or dist.get_rank() == 0:
            print("\n\n".join(texts))
        return 0
    except ValueError as error:
        print(f"hf-moe-accel generate: {error}", file=sys.stderr)
        return 2
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def _generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    empty = [i for i, row in enumerate(batch["attention_mask"]) if not row.any()] if "attention_mask" in batch else []
    if batch["input_ids"].shape[-1] == 0 or empty:  # generate() can't start from no token
        raise ValueError(f"--prompt {prompts[empty[0]] if empty else prompts[0]!r} has no tokens; give text the model can continue")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]
