"""Predicted against measured decode tokens/s on this GPU: the placement predictor's check.

    python scripts/check_predictor.py --out predictor_check            # everything (see --dry-run)
    python scripts/check_predictor.py --out predictor_check --dry-run  # the runs and their expected time
    python scripts/check_predictor.py --out predictor_check --shapes olmoe-1b-7b --plans single,single-eager --batch 1,32

1. Calibration: measured from scratch into OUT/cache (timed; the target is under 60 s), then asked
   again, which must come back from the cache file unchanged.
2. For each shape (random bf16 weights), plan and batch: the predictor's decode tokens/s and time to
   first token from that calibration, then a measured generate() of the same workload (prompt
   --prompt-len, --new-tokens forced, greedy; offload plans sampled, seeded, since random weights'
   greedy text repeats one token and the same experts; a full-length warm-up, median of --repeats).
   Plans: single (CUDA-graph decode), single-eager, offload-16 and offload-32 (`gpu_memory` 16 / 32 GiB,
   accelerate()'s defaults otherwise: a budget that holds every expert runs as the single-GPU plan).
Each row is printed and OUT/predictor_check.json rewritten as soon as it is measured, so a run cut
off keeps its rows; --time-limit skips the runs that would not finish in time. At the end,
OUT/predictor_check.md (the table for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from hf_moe_accel.costmodel.hardware import Hardware
from hf_moe_accel.costmodel.predictor import (
    RESERVE_GIB,
    PlacementPlan,
    Prediction,
    Workload,
    predict,
)
from hf_moe_accel.costmodel.shapes import ModelShape, load_shape

# cuda_graphs=True for offload as accelerate()'s default: it matters only when the budget holds every expert.
PLANS = {
    "single": (PlacementPlan("single", 1, True), None),
    "single-eager": (PlacementPlan("single", 1, False), None),
    "offload-16": (PlacementPlan("offload", 1, True), 16.0),
    "offload-32": (PlacementPlan("offload", 1, True), 32.0),
}
# Set-up rates (GB/s) behind the expected time of each run (--dry-run, --time-limit): building a
# random-weight model on the GPU, and moving weights between the GPU and the host (pageable). They
# only schedule the runs; re-derive them from a run's run_s against expected_run_s in
# OUT/predictor_check.json.
BUILD_GB_S = 2.0
MOVE_GB_S = 6.0


def _list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON, the markdown table and the calibration cache")
    parser.add_argument("--shapes", type=_list, default=["qwen3-30b-a3b", "olmoe-1b-7b"])
    parser.add_argument("--plans", type=_list, default=list(PLANS), help=f"among {', '.join(PLANS)}")
    parser.add_argument("--batch", type=lambda t: [int(v) for v in _list(t)], default=[1, 32, 128])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-calibration", action="store_true", help="reuse OUT/cache (fails if there is none)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: skip a run whose expected time would end past this (from the start)")
    parser.add_argument("--uniform-routing", action="store_true",
                        help="measure with the routing the predictor assumes (uniform draws; hf_moe_accel.bench.routing), "
                             "not the random-weight model's own, which repeats the same experts in decode")
    parser.add_argument("--dry-run", action="store_true", help="list the runs with their predicted time, measure nothing")
    args = parser.parse_args()
    unknown = sorted(set(args.plans) - set(PLANS))
    if unknown:
        parser.error(f"unknown plan(s) {', '.join(unknown)}; plans: {', '.join(PLANS)}")
    return args


def check_calibration(skip: bool) -> dict:
    from hf_moe_accel.bench.calibrate import calibrate
    from hf_moe_accel.costmodel.machine import cache_path, load_calibration

    if skip:
        hardware = load_calibration()
        if hardware is None:
            raise SystemExit(f"--skip-calibration: no calibration at {cache_path()}")
        return {"hardware": hardware, "seconds": None, "cached_seconds": None, "reused": True}
    start = time.perf_counter()
    measured = calibrate(refresh=True)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    cached = calibrate()
    cached_seconds = time.perf_counter() - start
    print(f"calibration: {seconds:.1f} s (target < 60 s); again from {cache_path()}: {cached_seconds:.3f} s, same: {cached == measured}")
    print(f"  {measured.describe()}")
    return {"hardware": measured, "seconds": seconds, "cached_seconds": cached_seconds, "reused": cached == measured}


def predicted_run_s(prediction: Prediction, workload: Workload, repeats: int, shape: ModelShape) -> float:
    """One measurement: generate() calls (a full warm-up, then per repeat a one-token and a full run)
    after the set-up. An offload run starts from the model on the host, experts pinned (PlanMeasurer
    builds it so): accelerate() moves the other weights to the GPU and unpatch() back, or the whole
    model when the budget holds every expert."""
    full = prediction.ttft_ms / 1e3 + workload.new_tokens * prediction.step_ms / 1e3
    calls = full * (1 + repeats) + repeats * prediction.ttft_ms / 1e3
    if prediction.plan.kind != "offload":
        return calls
    offloading = {"offload_round_trips", "zero_copy_reads"} & prediction.parts_ms.keys()
    moved = shape.non_expert_bytes if offloading else shape.total_bytes
    return 2 * moved / 1e9 / MOVE_GB_S + calls


def _run_hardware(hardware: Hardware, gpu_memory: float | None) -> Hardware:
    """An offload run's budget is `gpu_memory`: the predictor's GPU holds it plus its own reserve."""
    return hardware.with_gpu_memory(gpu_memory + RESERVE_GIB) if gpu_memory else hardware


def main() -> int:
    started = time.perf_counter()
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_MOE_ACCEL_CACHE"] = str(out / "cache")
    if args.dry_run:
        from hf_moe_accel.costmodel.hardware import hardware_preset
        from hf_moe_accel.costmodel.machine import hardware_of_this_machine

        hardware = hardware_of_this_machine() if torch.cuda.is_available() else hardware_preset("h100")
        calibration = {"hardware": hardware}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("check_predictor measures on a CUDA GPU; --dry-run lists the runs without one")
        calibration = check_calibration(args.skip_calibration)
    hardware = calibration["hardware"]

    runs, shapes = [], {}
    for shape_name in args.shapes:
        shape = shapes[shape_name] = load_shape(shape_name)
        for plan_name in args.plans:
            plan, gpu_memory = PLANS[plan_name]
            for batch in args.batch:
                workload = Workload(batch, args.prompt_len, args.new_tokens)
                prediction = predict(shape, _run_hardware(hardware, gpu_memory), plan, workload)
                expected_s = predicted_run_s(prediction, workload, args.repeats, shape) if prediction.feasible else 0.0
                runs.append((shape_name, plan_name, plan, gpu_memory, workload, prediction, expected_s))
    # Per shape: build it on the GPU, and move it back there after the offload runs (on the host).
    offloading = any(PLANS[p][0].kind == "offload" for p in args.plans)
    expected = sum(s.total_bytes / 1e9 * (1 / BUILD_GB_S + (1 / MOVE_GB_S if offloading else 0.0)) for s in shapes.values())
    expected += sum(run[-1] for run in runs)
    print(f"{len(runs)} runs, expected about {expected / 60:.1f} min of measuring (plus calibration, < 1 min)")
    for shape_name, plan_name, _, _, workload, prediction, expected_s in runs:
        note = f"~{expected_s:.0f} s" if prediction.feasible else f"skipped: {prediction.reason}"
        print(f"  {shape_name} {plan_name} batch {workload.batch}: predicted {prediction.decode_tokens_per_s:,.1f} tok/s, {note}")
    if args.dry_run:
        return 0

    from hf_moe_accel.bench.plan_check import PlanMeasurer

    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "calibration": {**{k: v for k, v in calibration.items() if k != "hardware"}, "hardware": hardware.to_json()},
        "rows": [],
        "command": " ".join(sys.argv),
    }
    for shape_name in args.shapes:
        measurer = PlanMeasurer(shape_name, uniform_routing=args.uniform_routing)
        for name, plan_name, plan, gpu_memory, workload, prediction, expected_s in runs:
            if name != shape_name:
                continue
            row = {"shape": name, "plan": plan_name, "batch": workload.batch, "predicted": prediction.as_dict()}
            elapsed = time.perf_counter() - started
            if not prediction.feasible:
                row["skipped"] = prediction.reason
            elif args.time_limit is not None and elapsed + expected_s > args.time_limit:
                row["skipped"] = f"expected {expected_s:.0f} s, {args.time_limit - elapsed:.0f} s of --time-limit left"
                print(f"{name} {plan_name} batch {workload.batch}: {row['skipped']}", flush=True)
            else:
                start = time.perf_counter()
                measured = measurer.measure(plan, workload, args.repeats, gpu_memory_gib=gpu_memory)
                row["measured"] = measured
                row["run_s"], row["expected_run_s"] = time.perf_counter() - start, expected_s
                row["ratio"] = measured["decode_tokens_per_s"] / prediction.decode_tokens_per_s
                print(f"{name} {plan_name} batch {workload.batch}: predicted {prediction.decode_tokens_per_s:,.1f}, "
                      f"measured {measured['decode_tokens_per_s']:,.1f} tok/s ({row['ratio']:.2f}x); "
                      f"run {row['run_s']:.0f} s (expected {expected_s:.0f})", flush=True)
            report["rows"].append(row)
            (out / "predictor_check.json").write_text(json.dumps(report, indent=2))
        del measurer
        torch.cuda.empty_cache()

    (out / "predictor_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    calibration = report["calibration"]
    lines = [
        f"Device: {report['device']}, torch {report['torch']}. Command: `{report['command']}`",
        "",
        (
            f"Calibration: {calibration['seconds'] or 0:.1f} s; read back from its cache in {calibration['cached_seconds'] or 0:.3f} s "
            f"(same figures: {calibration['reused']})."
        ),
        "",
        "| shape | plan | batch | predicted tok/s | measured tok/s | measured / predicted | within 25% | predicted TTFT ms | measured TTFT ms | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        p = row["predicted"]
        if "measured" not in row:
            lines.append(f"| {row['shape']} | {row['plan']} | {row['batch']} | - | - | - | skipped: {row['skipped']} | - | - | - |")
            continue
        m = row["measured"]
        peak = f"{m['peak_memory_gib']:.1f}" if m.get("peak_memory_gib") is not None else "-"
        within = "yes" if abs(row["ratio"] - 1) <= 0.25 else "no"
        lines.append(
            f"| {row['shape']} | {row['plan']} | {row['batch']} | {p['decode_tokens_per_s']:,.1f} | {m['decode_tokens_per_s']:,.1f} | "
            f"{row['ratio']:.2f} | {within} | {p['ttft_ms']:,.0f} | {1e3 * m['ttft_s']:,.0f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
