"""Host time per decoder layer of an eager decode step, per model family and width, on the GPU.

    python scripts/profile_eager_step.py --out OUT [--families olmoe,qwen3_moe] [--widths tiny,real] [--layers 2,8,48]

The predictor prices eager decode as host time per layer (calibrated on a tiny qwen3_moe model) plus
the GPU's work. This measures the batch-1 eager step time (generate() of 24 tokens less one token, as
calibration times it) per family, width (tiny as calibration builds it, or the preset's real widths)
and layer count (`--layers`), stock's and ours (`accelerate(model, cuda_graphs=False)`; also with
Python's GC off, and with `--uniform-routing` under the benches' uniform routing), and the slope
per layer. A cProfile of one 8-token generate() of the first layer count, ours, by own time, goes to
OUT/eager_profile_<family>_<width>.txt. JSON: OUT/profile_eager_step.json (ms a step).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
from pathlib import Path

import torch

from hf_moe_accel import accelerate
from hf_moe_accel.bench.calibrate import _decode_step_s, _tiny_model
from hf_moe_accel.bench.routing import uniform_routing
from hf_moe_accel.costmodel.presets import build_preset

REAL = {"olmoe": "olmoe-1b-7b", "qwen3_moe": "qwen3-30b-a3b", "mixtral": "mixtral-8x7b"}


def _model(family: str, width: str, layers: int, device: torch.device):
    """The tiny model calibration times, or the family's preset at its real widths, of `layers` layers."""
    if width == "tiny":
        return _tiny_model(layers, device, family)
    return build_preset(REAL[family], device, torch.bfloat16, overrides={"num_hidden_layers": layers})


def _profile(model, device: torch.device) -> str:
    ids = torch.randint(1, 1000, (1, 16), device=device)
    profiler = cProfile.Profile()
    profiler.enable()
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    return text.getvalue()


def _variants(model, device: torch.device, uniform: bool) -> dict[str, float]:
    """Seconds per eager step of the accelerated `model`: as is; with Python's cyclic GC off (a
    deeper model has more objects for each full collection to walk); with uniform routing (as
    check_predictor.py --uniform-routing runs)."""
    steps = {"ours": _decode_step_s(model, device)}
    gc.disable()
    try:
        steps["ours_gc_off"] = _decode_step_s(model, device)
    finally:
        gc.enable()
    if uniform:
        with uniform_routing(model, seed=0):
            steps["ours_uniform_routing"] = _decode_step_s(model, device)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", default="olmoe,qwen3_moe")
    parser.add_argument("--widths", default="tiny,real")
    parser.add_argument("--layers", default="2,8", help="layer counts; the slope is taken between the first and the last")
    parser.add_argument("--no-stock", action="store_true", help="time ours only")
    parser.add_argument("--uniform-routing", action="store_true", help="also time ours under bench.routing.uniform_routing")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (its times mean little)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    counts = [int(v) for v in args.layers.split(",")]
    rows = []
    for family in args.families.split(","):
        for width in args.widths.split(","):
            for layers in counts:
                model = _model(family, width, layers, device)
                row = {"family": family, "width": width, "layers": layers}
                if not args.no_stock:
                    row["stock"] = _decode_step_s(model, device)
                accelerate(model, cuda_graphs=False)
                row.update(_variants(model, device, args.uniform_routing))
                if layers == counts[0]:
                    (out / f"eager_profile_{family}_{width}.txt").write_text(_profile(model, device))
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row = {k: 1e3 * v if isinstance(v, float) else v for k, v in row.items()}  # ms a step
                rows.append(row)
                print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                (out / "profile_eager_step.json").write_text(json.dumps(rows, indent=2))
            first, last = rows[-len(counts)], rows[-1]
            slopes = {k: 1e3 * (last[k] - first[k]) / (counts[-1] - counts[0])
                      for k in last if isinstance(last[k], float)}
            print(f"{family} {width}: us a layer, layers {counts[0]} to {counts[-1]}:",
                  {k: round(v, 1) for k, v in slopes.items()}, flush=True)


if __name__ == "__main__":
    main()
