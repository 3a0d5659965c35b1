"""The candidate plans for a machine, ranked by predicted decode tokens/s."""

from __future__ import annotations

from .hardware import Hardware
from .predictor import PlacementPlan, Prediction, Workload, predict
from .shapes import ModelShape


def gpu_counts(total: int) -> list[int]:
    """The multi-GPU sizes worth listing: powers of two below `total`, and `total` itself."""
    counts = {n for n in (2, 4, 8, 16, 32, 64) if n < total}
    if total > 1:
        counts.add(total)
    return sorted(counts)


def candidate_plans(hardware: Hardware, kinds: tuple[str, ...] | None = None) -> list[PlacementPlan]:
    """Every plan this hardware can run (memory not yet checked), optionally of some kinds only."""
    plans = [PlacementPlan("single", 1, True), PlacementPlan("single", 1, False), PlacementPlan("offload", 1, True)]  # offload: zero-copy decode in graphs
    for n in gpu_counts(hardware.gpu_count):
        plans.append(PlacementPlan("pp", n, False))
        for kind in ("ep", "tp", "dp"):
            plans += [PlacementPlan(kind, n, True), PlacementPlan(kind, n, False)]
    return [p for p in plans if kinds is None or p.kind in kinds]


def rank_plans(
    shape: ModelShape, hardware: Hardware, workload: Workload, plans: list[PlacementPlan] | None = None
) -> list[Prediction]:
    """Predictions of `plans` (default: every candidate), feasible ones first, fastest first.

    The offload plan is listed only when the whole model doesn't fit on one GPU: with room to spare
    it is the single-GPU plan.
    """
    plans = candidate_plans(hardware) if plans is None else plans
    predictions = [predict(shape, hardware, plan, workload) for plan in plans]
    single_fits = any(p.feasible for p in predictions if p.plan.kind == "single")
    if single_fits:
        predictions = [p for p in predictions if p.plan.kind != "offload"]
    # Fastest first; at equal speed, fewer GPUs.
    return sorted(predictions, key=lambda p: (not p.feasible, -round(p.decode_tokens_per_s, 6) if p.feasible else 0.0, p.plan.gpus))


def best_plan(predictions: list[Prediction]) -> Prediction:
    """The fastest feasible prediction; ValueError naming the closest miss when none fits."""
    feasible = [p for p in predictions if p.feasible]
    if feasible:
        return max(feasible, key=lambda p: p.decode_tokens_per_s)
    reasons = "; ".join(f"{p.plan.label}: {p.reason}" for p in predictions)
    raise ValueError(f"no plan fits: {reasons}")


def format_table(predictions: list[Prediction]) -> str:
    """A markdown table of the feasible plans (rank, plan, launch, tokens/s, step, TTFT, memory per
    GPU, what bounds the step), then one line per reason the others can't run."""
    header = ["#", "plan", "launch", "decode tok/s", "step ms", "TTFT ms", "GiB per GPU", "bound by"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    feasible = [p for p in predictions if p.feasible]
    for rank, p in enumerate(feasible, 1):
        cells = [str(rank), p.plan.label, p.plan.launch, f"{p.decode_tokens_per_s:,.1f}", f"{p.step_ms:.2f}",
                 f"{p.ttft_ms:,.0f}", f"{p.memory_gib:.1f}", _dominant_part(p)]
        lines.append("| " + " | ".join(cells) + " |")
    if not feasible:
        lines.append("| - | no plan fits | | | | | | |")
    refused: dict[str, list[str]] = {}
    for p in predictions:
        if not p.feasible:
            refused.setdefault(p.reason, []).append(p.plan.label)
    lines += [f"- can't run: {', '.join(labels)}: {reason}" for reason, labels in refused.items()]
    return "\n".join(lines)


def _dominant_part(prediction: Prediction) -> str:
    parts = prediction.parts_ms
    if not parts:
        return ""
    name, value = max(parts.items(), key=lambda kv: kv[1])
    return f"{name} {100 * value / prediction.step_ms:.0f}% of step"
