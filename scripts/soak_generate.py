"""Soak: many generate() calls of random shapes under CUDA graphs, each checked as it goes.

    python scripts/soak_generate.py --model ../shared/fixtures/tiny-qwen3-moe --json soak.json
    python scripts/soak_generate.py --model ../shared/fixtures/tiny-qwen3-moe --gpu-memory 0.3 --json soak_offload.json

The calls (--calls, default 500; --seed): batch 1-8, prompt 4-600 tokens (random ids; each row after
the first left-padded to a random shorter length), 1-64 new tokens (half the calls forced to that
length with min_new_tokens), greedy or sampled (--sampled-share). Checks, each call:
- a greedy call's tokens against the same model decoding the same call eagerly: the call again with a
  static cache of the length the pool gave it passed in (a cache passed in runs stock generate(): no
  graph, an eager prefill; its one log line saying so is expected). They must be equal, or part only at
  a near tie: where the reference scored
  the two tokens within --tie-tolerance of each other, relative to the score (rounding: a prefill graph
  runs the prompt padded to its bucket, so its kernels run at other shapes than the eager prefill's);
- a sampled call's tokens are well formed (batch, length, vocabulary);
- the graph pool within its bound: no more pooled caches than it keeps, every graph held is one over
  a pooled cache, and no more graphs than those caches account for;
and torch.cuda.memory_allocated() after call 50 and after the last call (each after a garbage
collection) within --memory-slack-mib (64): a leak grows it, the pool's churn doesn't.

--gpu-memory SIZE|SHARE runs the model offloaded instead (a size such as "2GiB", or a share in (0, 1):
the smallest budget plus that share of the experts' bytes), in float32 beside the same weights resident
on the GPU in float32: the peak of each call's GPU memory is checked against the budget, and each
greedy call's tokens against the resident model's (offloaded sums add in another order than the
resident kernels': the same near-tie rule).

--model PATH loads a checkpoint (the fixtures); --preset NAME builds a random-weight preset
(hf_moe_accel.costmodel.presets; --layers keeps fewer layers). The JSON summary (--json) holds the
arguments, the versions, every check and its failures (the first few of each); the exit status is 1
when a check failed. The logic is importable (`run_soak`, `build_models`, `main`):
tests/test_concurrency_faults.py runs it on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_moe_accel import OffloadOptions, accelerate
from hf_moe_accel.costmodel.memory import length_bucket, parse_memory_size
from hf_moe_accel.costmodel.presets import PRESETS, build_preset
from hf_moe_accel.graphs import graph_stats
from hf_moe_accel.graphs.cache_pool import graph_static_cache
from hf_moe_accel.graphs.generate import GraphBackend, decode_state, enable_graph_decode
from hf_moe_accel.graphs.hooks import NO_HOOKS
from hf_moe_accel.offload.engine import decode_hooks, is_offloaded, prepare_offload

try:  # prefill graphs, where this checkout has them, are held beside the decode steps, up to a bound of their own
    from hf_moe_accel.graphs.prefill import MAX_PREFILL_GRAPHS
except ImportError:
    MAX_PREFILL_GRAPHS = 0

# A decode step's inputs come in one layout per pooled cache (ids, positions, the 2D mask padded to the
# cache); twice that bounds the decode graphs held even if generate() varied a layout between calls.
GRAPHS_PER_CACHE = 2
MiB = 2**20
# Failures kept in the summary per check (the count is always whole).
KEPT_FAILURES = 20
# Sampling settings of the sampled calls: common ones, with a few processors in the loop.
SAMPLING = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=50)


@dataclass(frozen=True)
class Limits:
    """The range each call's shape is drawn from, and the checks' thresholds."""

    max_batch: int = 8
    min_prompt: int = 4
    max_prompt: int = 600
    max_new_tokens: int = 64
    sampled_share: float = 0.5
    memory_check_after: int = 50  # the first memory reading; the second is after the last call
    memory_slack: int = 64 * MiB
    tie_tolerance: float = 1e-4  # a parting's score gap allowed, relative to the score (near_tie)


@dataclass(frozen=True)
class Shape:
    index: int
    batch: int
    prompt: int
    new_tokens: int
    sampled: bool
    forced: bool  # min_new_tokens = max_new_tokens: no early EOS


def draw_shapes(calls: int, seed: int, limits: Limits) -> list[Shape]:
    """The calls' shapes, drawn uniformly from `limits` (the same seed, the same calls)."""
    rng = random.Random(seed)
    return [Shape(i, rng.randint(1, limits.max_batch), rng.randint(limits.min_prompt, limits.max_prompt),
                  rng.randint(1, limits.max_new_tokens), rng.random() < limits.sampled_share, rng.random() < 0.5)
            for i in range(calls)]


def make_inputs(shape: Shape, vocab: int, pad: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random prompt ids (never the pad id) with a mask; every row after the first left-padded to a random shorter length."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shape.index)
    ids = torch.randint(0, vocab - 1, (shape.batch, shape.prompt), generator=generator)
    ids += (ids >= pad).long()  # skip the pad id: a prompt token equal to it would read as padding
    mask = torch.ones_like(ids)
    for row in range(1, shape.batch):
        padding = int(torch.randint(0, shape.prompt, (1,), generator=generator))  # at least one real token stays
        ids[row, :padding] = pad
        mask[row, :padding] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def generate_kwargs(shape: Shape, pad: int) -> dict:
    kwargs = dict(max_new_tokens=shape.new_tokens, pad_token_id=pad, **(SAMPLING if shape.sampled else {"do_sample": False}))
    if shape.forced:
        kwargs["min_new_tokens"] = shape.new_tokens
    return kwargs


# The default tie tolerance by dtype: a few roundings of a score in half precision (2**-8 apart at
# bf16's precision), a few hundred float32 ones (sums in another order over a whole model).
TIE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2**-6, "float16": 2**-6}


@dataclass
class Parting:
    """Where a greedy row's tokens part from the reference's: the step, both tokens, and how far apart
    the reference scored them (0: a tie), against the reference's score of its own token."""

    call: int
    row: int
    step: int
    ours: int
    reference: int
    score_gap: float
    score: float

    def near_tie(self, tolerance: float) -> bool:
        """Whether the reference scored both tokens within `tolerance` of each other, relative to the score."""
        return self.score_gap <= tolerance * max(1.0, abs(self.score))


def partings(call: int, ours: torch.Tensor, reference: torch.Tensor, scores: tuple[torch.Tensor, ...],
             prompt: int, pad: int) -> list[Parting]:
    """Each row's first parting from the reference (rows that agree have none)."""
    length = max(ours.shape[1], reference.shape[1])
    ours, reference = (torch.nn.functional.pad(t, (0, length - t.shape[1]), value=pad).cpu() for t in (ours, reference))
    found = []
    for row in range(ours.shape[0]):
        differ = (ours[row, prompt:] != reference[row, prompt:]).nonzero()
        if differ.numel() == 0:
            continue
        step = int(differ[0])
        mine, theirs = int(ours[row, prompt + step]), int(reference[row, prompt + step])
        if step < len(scores):
            score = float(scores[step][row, theirs])
            found.append(Parting(call, row, step, mine, theirs, score - float(scores[step][row, mine]), score))
        else:  # ours went on after the reference stopped
            found.append(Parting(call, row, step, mine, theirs, float("inf"), 0.0))
    return found


def malformed(shape: Shape, tokens: torch.Tensor, vocab: int) -> str | None:
    """Why a sampled call's output is not what generate() returns for its shape, or None."""
    if tokens.shape[0] != shape.batch:
        return f"{tokens.shape[0]} rows for batch {shape.batch}"
    if not shape.prompt < tokens.shape[1] <= shape.prompt + shape.new_tokens:
        return f"{tokens.shape[1]} tokens for a {shape.prompt}-token prompt and {shape.new_tokens} new"
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        return f"token ids outside the vocabulary [0, {vocab})"
    return None


def pool_problems(model: nn.Module) -> list[str]:
    """What breaks the graph pool's promise now: caches beyond its bound, a graph over a cache it no
    longer holds, more graphs than its caches account for."""
    stats = graph_stats(model)
    if stats is None:
        return []
    problems = []
    if stats["pooled_caches"] > stats["max_pooled_caches"]:
        problems.append(f"{stats['pooled_caches']} pooled caches, bound {stats['max_pooled_caches']}")
    if stats["caches_with_graphs"] > stats["pooled_caches"]:
        problems.append(f"graphs over {stats['caches_with_graphs']} caches, {stats['pooled_caches']} pooled")
    bound = GRAPHS_PER_CACHE * stats["max_pooled_caches"] + MAX_PREFILL_GRAPHS
    if stats["graphs_held"] > bound:
        problems.append(f"{stats['graphs_held']} graphs held, bound {bound}")
    return problems


def _brief(stats: dict | None) -> str:
    if stats is None:
        return "no graph decode"
    return ", ".join(f"{key} {stats[key]}" for key in ("captures", "replays", "eager_steps", "pooled_caches", "graphs_held"))


Reference = Callable[[Shape, dict, dict], object]  # (shape, inputs, generate kwargs) -> generate()'s output with scores


def _cache_argument(model: nn.Module) -> str:
    """generate()'s name for a cache passed in: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _cache_tokens(served: nn.Module, shape: Shape) -> int:
    """The positions of the static cache the served call decoded over: the pool's last cache when it was
    this call's (its batch and room enough), else what generate() asks for."""
    needed = shape.prompt + shape.new_tokens
    state = decode_state(served)
    last = state.pool.last_key if state is not None else None
    if last is not None and last[0] == shape.batch and last[1] >= needed:
        return last[1]
    return length_bucket(needed)


def eager_reference(reference_model: nn.Module, served: nn.Module) -> Reference:
    """`reference_model` decoding a call eagerly over a static cache of the served call's length: passed
    in, so stock generate() runs (no graph, no compile) over the same cache layout."""
    name = _cache_argument(reference_model)
    config = reference_model.config.get_text_config(decoder=True)

    def run(shape: Shape, inputs: dict, kwargs: dict):
        cache = graph_static_cache(config, _cache_tokens(served, shape))
        return reference_model.generate(**inputs, **kwargs, **{name: cache}, disable_compile=True,
                                        return_dict_in_generate=True, output_scores=True)

    return run


@dataclass
class SoakResult:
    calls: int = 0
    greedy_calls: int = 0
    greedy_equal: int = 0
    near_tie_count: int = 0  # rows that parted from the reference at a near tie
    near_ties: list[dict] = field(default_factory=list)
    greedy_failures: list[dict] = field(default_factory=list)
    greedy_failure_count: int = 0
    sampled_calls: int = 0
    sampled_failures: list[dict] = field(default_factory=list)
    pool_failures: list[dict] = field(default_factory=list)
    max_pooled_caches_seen: int = 0
    max_graphs_held_seen: int = 0
    memory_allocated: dict[int, int] = field(default_factory=dict)  # after call (1-based) -> bytes
    memory_growth: int | None = None
    budget: int | None = None
    peak_max: int | None = None
    budget_failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def failed_checks(self, limits: Limits) -> list[str]:
        failed = []
        if self.greedy_failure_count:
            failed.append(f"{self.greedy_failure_count} greedy calls parted from eager decoding")
        if self.sampled_failures:
            failed.append(f"{len(self.sampled_failures)} sampled calls malformed")
        if self.pool_failures:
            failed.append(f"the graph pool broke its bound after {len(self.pool_failures)} calls")
        if self.memory_growth is not None and abs(self.memory_growth) > limits.memory_slack:
            failed.append(f"memory_allocated moved {self.memory_growth / MiB:.1f} MiB between its readings "
                          f"(slack {limits.memory_slack / MiB:.0f} MiB)")
        if self.budget_failures:
            failed.append(f"{len(self.budget_failures)} calls peaked above the GPU budget")
        return failed


class Soak:
    """Runs the calls on `model` one by one, checking each (module docstring)."""

    def __init__(self, model: nn.Module, reference: Reference, limits: Limits, seed: int, *, budget: int | None = None,
                 memory_base: int = 0, log: Callable[[str], None] = print):
        self.model = model
        self.reference = reference
        self.limits = limits
        self.seed = seed
        self.budget = budget  # the offload's GPU budget: each call's peak above memory_base stays within it
        self.memory_base = memory_base
        self.log = log
        self.device = model.device  # where the inputs go (an offloaded model's non-expert weights)
        self.cuda = self.device.type == "cuda"
        config = model.config.get_text_config(decoder=True)
        self.vocab = config.vocab_size
        self.pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.result = SoakResult(budget=budget)

    def run(self, shapes: list[Shape]) -> SoakResult:
        start = time.perf_counter()
        # Memory is read after the first `memory_check_after` calls (fewer in a shorter run) and after the last.
        readings = {min(self.limits.memory_check_after, len(shapes)), len(shapes)}
        for done, shape in enumerate(shapes, start=1):
            self._call(shape)
            self._check_pool(shape)
            if done in readings:
                self._read_memory(done)
            if done % 50 == 0:
                self.log(f"{done} calls, {time.perf_counter() - start:.0f} s: {_brief(graph_stats(self.model))}")
        self.result.seconds = time.perf_counter() - start
        values = list(self.result.memory_allocated.values())
        if values:
            self.result.memory_growth = values[-1] - values[0]
        return self.result

    def _call(self, shape: Shape) -> None:
        inputs = make_inputs(shape, self.vocab, self.pad, self.seed, self.device)
        kwargs = generate_kwargs(shape, self.pad)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        ours = self.model.generate(**inputs, **kwargs)
        self._check_budget(shape)
        self.result.calls += 1
        if shape.sampled:
            self._check_sampled(shape, ours)
        else:
            self._check_greedy(shape, inputs, kwargs, ours)

    def _check_budget(self, shape: Shape) -> None:
        if self.budget is None or not self.cuda:
            return
        peak = torch.cuda.max_memory_allocated() - self.memory_base
        self.result.peak_max = max(self.result.peak_max or 0, peak)
        if peak > self.budget:
            self._keep(self.result.budget_failures, {"call": shape.index, "peak": peak, "budget": self.budget})

    def _check_sampled(self, shape: Shape, tokens: torch.Tensor) -> None:
        self.result.sampled_calls += 1
        reason = malformed(shape, tokens, self.vocab)
        if reason is not None:
            self._keep(self.result.sampled_failures, {"call": shape.index, "reason": reason})

    def _check_greedy(self, shape: Shape, inputs: dict, kwargs: dict, ours: torch.Tensor) -> None:
        self.result.greedy_calls += 1
        reference = self.reference(shape, inputs, kwargs)
        found = partings(shape.index, ours, reference.sequences, reference.scores, shape.prompt, self.pad)
        failures = [p for p in found if not p.near_tie(self.limits.tie_tolerance)]
        for parting in found:
            target = self.result.greedy_failures if parting in failures else self.result.near_ties
            self._keep(target, {**asdict(parting), "shape": asdict(shape)})
        self.result.near_tie_count += len(found) - len(failures)
        if not found:
            self.result.greedy_equal += 1
        if failures:
            self.result.greedy_failure_count += 1
            self.log(f"call {shape.index} {shape}: parted from the reference: {failures[0]}")

    def _check_pool(self, shape: Shape) -> None:
        stats = graph_stats(self.model)
        if stats is not None:
            self.result.max_pooled_caches_seen = max(self.result.max_pooled_caches_seen, stats["pooled_caches"])
            self.result.max_graphs_held_seen = max(self.result.max_graphs_held_seen, stats["graphs_held"])
        problems = pool_problems(self.model)
        if problems:
            self._keep(self.result.pool_failures, {"call": shape.index, "problems": problems})

    def _read_memory(self, done: int) -> None:
        if not self.cuda:
            return
        gc.collect()  # what something still holds counts, not garbage a collection would free
        torch.cuda.synchronize()
        self.result.memory_allocated[done] = torch.cuda.memory_allocated()

    @staticmethod
    def _keep(failures: list, entry: dict) -> None:
        if len(failures) < KEPT_FAILURES:
            failures.append(entry)


def run_soak(model: nn.Module, reference: Reference, calls: int, seed: int = 0, limits: Limits = Limits(), *,
             budget: int | None = None, memory_base: int = 0, log: Callable[[str], None] = print) -> dict:
    """`calls` generate() calls of random shapes on `model`, each checked (module docstring); the summary."""
    result = Soak(model, reference, limits, seed, budget=budget, memory_base=memory_base, log=log).run(
        draw_shapes(calls, seed, limits))
    failed = result.failed_checks(limits)
    return {"ok": not failed, "failed_checks": failed, **asdict(result), "graph_stats": graph_stats(model)}


@dataclass
class Models:
    """What a soak runs: the model under test, what its greedy calls are checked against, its budget."""

    served: nn.Module
    reference: Reference
    budget: int | None = None
    memory_base: int = 0


def _load(args: argparse.Namespace, dtype: torch.dtype, device: str) -> nn.Module:
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device).eval()
    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    return build_preset(args.preset, device, dtype, seed=args.seed, overrides=overrides)


def _with_graphs(model: nn.Module, backend: GraphBackend | None, **options) -> nn.Module:
    """accelerate(model, **options) under graph decode: CUDA graphs, or `backend` (a test's CPU stand-in)."""
    if backend is None:
        return accelerate(model, **options)
    accelerate(model, cuda_graphs=False, **options)
    enable_graph_decode(model, backend, hooks=decode_hooks(model) if is_offloaded(model) else NO_HOOKS)
    return model


def offload_budget(model: nn.Module, gpu_memory: str, options: OffloadOptions) -> int:
    """Bytes of `gpu_memory`: a size, or a share in (0, 1) of the experts above the smallest budget that runs."""
    try:
        share = float(gpu_memory)
    except ValueError:
        return parse_memory_size(gpu_memory)
    if not 0 < share < 1:
        return parse_memory_size(gpu_memory)
    budget = prepare_offload(model, 10**12, options).budget
    return budget.minimum + int(share * sum(b * e for b, e in zip(budget.expert_bytes, budget.num_experts)))


def offload_options(limits: Limits, device: str) -> OffloadOptions:
    """KV and activation room for the largest call the limits draw, so the budget holds every call."""
    return OffloadOptions(kv_cache_tokens=limits.max_batch * length_bucket(limits.max_prompt + limits.max_new_tokens),
                          prefill_tokens=limits.max_batch * limits.max_prompt, device=device)


def build_models(args: argparse.Namespace, limits: Limits, backend: GraphBackend | None = None,
                 options: OffloadOptions | None = None) -> Models:
    """The resident model under graphs, checked against itself decoding eagerly; or (--gpu-memory) the
    offloaded float32 model, checked against the same weights resident in float32."""
    device = args.device
    if args.gpu_memory is None:
        model = _with_graphs(_load(args, getattr(torch, args.dtype), device), backend)
        return Models(model, eager_reference(model, model))
    resident = _load(args, torch.float32, "cpu")  # both hold the same weights: a preset's are drawn from --seed
    offloaded = _load(args, torch.float32, "cpu")
    accelerate(resident.to(device), cuda_graphs=False)
    options = options or offload_options(limits, device)
    budget = offload_budget(offloaded, args.gpu_memory, options)
    cuda = torch.cuda.is_available() and device != "cpu"
    base = torch.cuda.memory_allocated() if cuda else 0  # the resident model's own memory and the rest before
    _with_graphs(offloaded, backend, gpu_memory=budget, offload=options)
    return Models(offloaded, eager_reference(resident, offloaded), budget, base)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a checkpoint folder (e.g. ../shared/fixtures/tiny-qwen3-moe)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a random-weight preset")
    parser.add_argument("--layers", type=int, help="with --preset: this many layers")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the resident soak's dtype (the offload soak runs float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-memory", help="run offloaded: a size ('2GiB') or a share in (0, 1) of the experts")
    parser.add_argument("--max-batch", type=int, default=Limits.max_batch)
    parser.add_argument("--min-prompt", type=int, default=Limits.min_prompt)
    parser.add_argument("--max-prompt", type=int, default=Limits.max_prompt)
    parser.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens)
    parser.add_argument("--sampled-share", type=float, default=Limits.sampled_share)
    parser.add_argument("--memory-check-after", type=int, default=Limits.memory_check_after)
    parser.add_argument("--memory-slack-mib", type=float, default=Limits.memory_slack / MiB)
    parser.add_argument("--tie-tolerance", type=float,
                        help="a greedy row may part where the reference's two scores are this close, relative to the "
                             f"score (default by dtype: {TIE_TOLERANCE})")
    parser.add_argument("--json", type=Path, help="write the summary here")
    return parser.parse_args(argv)


def limits_of(args: argparse.Namespace) -> Limits:
    dtype = "float32" if args.gpu_memory is not None else args.dtype
    tolerance = args.tie_tolerance if args.tie_tolerance is not None else TIE_TOLERANCE[dtype]
    return Limits(args.max_batch, args.min_prompt, args.max_prompt, args.max_new_tokens, args.sampled_share,
                  args.memory_check_after, int(args.memory_slack_mib * MiB), tolerance)


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for package in ("transformers", "triton", "hf-moe-accel"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv: list[str] | None = None, backend: GraphBackend | None = None, options: OffloadOptions | None = None) -> dict:
    """Run the soak the arguments describe; `backend` and `options` are for tests (a CPU graph stand-in, offload options)."""
    args = parse_args(argv)
    limits = limits_of(args)
    models = build_models(args, limits, backend, options)
    summary = run_soak(models.served, models.reference, args.calls, args.seed, limits, budget=models.budget,
                       memory_base=models.memory_base)
    summary = {"arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "limits": asdict(limits), "versions": versions(), **summary}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    print("ok" if summary["ok"] else f"FAILED: {'; '.join(summary['failed_checks'])}",
          f"({summary['calls']} calls, {summary['seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(0 if main()["ok"] else 1)
