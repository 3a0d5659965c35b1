"""CPU expert offload with a GPU expert cache: `accelerate(model, gpu_memory="24GiB")`.

Non-expert weights, the KV cache and the workspace stay on the GPU; every MoE layer gets as many
expert slots as the rest of the budget holds; all experts live in pinned host memory. Each layer's
forward (`offload_layer.py`) runs cached experts on the GPU through the fused kernels and serves
each miss on the CPU or by a fetch, whichever the calibrated cost model says finishes sooner.

The "GPU side" is a device parameter: with `OffloadOptions(device="cpu")` the CPU stands in for
it (slots are CPU tensors, copies are plain copies), so the cache, eviction, miss routing and CPU
experts run through the same code in tests without a GPU.

FP8 experts (Transformers' FP8Experts, or `expert_dtype="fp8"`) are offloaded as they are stored: FP8
weights with their float32 block scales, in host memory and in the slots alike (`expert_cache`). The
budget is split before `patch_model` quantizes anything, so `prepare_offload` sizes an expert that
expert_dtype will quantize by its FP8 layout, and `apply_offload` (after the quantization) checks the
experts it finds against that plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..costmodel.memory import (
    SlotBudget,
    parse_memory_size,
    reserve_bytes,
    split_budget,
)
from ..costmodel.predictor import ZERO_COPY_MAX_BATCH
from ..graphs.hooks import DecodeHooks
from ..kernels.experts_fp8_reference import FP8_DTYPE
from ..kernels.spec import Activation, BlockScales, ExpertWeights, is_experts_module
from ..kernels.tuning import interpreting
from ..patches.expert_dtype import BLOCK_SIZE, ExpertDtype, needs_quantizing
from ..patches.experts import EXPERTS_IMPLEMENTATION, expert_weights, experts_state
from ..patches.fp8_experts import is_fp8_experts
from ..patches.registry import ADAPTER_BY_MODEL_TYPE
from ..state import drop_state_if_empty, ensure_state, state_of
from .cpu_experts import CpuExpertsWorker, compute_dtype
from .eviction import PolicyFactory, policy_factory
from .expert_cache import ExpertCache, bytes_per_expert, expert_tensors, unpack_lookups
from .host_int4 import HOST_DTYPES, int4_experts, int4_problem
from .host_weights import WeightPlacement
from .layer import OffloadedLayer, RefusesCopies
from .miss_cost import (
    MISS_POLICIES,
    CopyLaneClock,
    CpuTimeCorrection,
    MissCostModel,
    MissPolicy,
    calibrate_miss_costs,
)
from .miss_drop import check_miss_drop_threshold, renormalisation_by_block
from .stats import PHASES, LayerOffloadStats, OffloadStats
from .transfers import DeviceLanes

logger = logging.getLogger("hf_moe_accel")

HostDtype = Literal["int4"]



@dataclass(frozen=True)
class OffloadOptions:
    """Knobs of `accelerate(model, gpu_memory=..., offload=OffloadOptions(...))`; the defaults suit most uses.

    eviction: "lfu", "lru", "routing" (moving average of router weight mass), or a callable
        `num_experts -> EvictionPolicy` (see placement/eviction.py).
    miss_policy: "auto" (the cost model picks CPU or fetch per missed expert), "fetch" (every miss
        fetched into a slot), "cpu" (misses always computed on the CPU).
    prefetch: copy the next layer's likely experts (its router run on this layer's input) into slots.
    prefetch_experts: at most this many prefetched per layer and forward (default: the layer's top-k);
        fewer when the copy lane has no spare time for them.
    prefetch_min_accuracy: a layer's prefetch pauses while fewer than this share of the experts it
        would prefetch are then routed to (a moving average). Its predictions are still checked, so it
        resumes when they come true again. 0 never pauses.
    kv_cache_tokens: tokens of KV cache to keep room for (batch x (prompt + new tokens) of a generate()).
    prefill_tokens: tokens of the largest forward to keep activation room for (batch x prompt length).
    reserve: the GPU memory kept beside the weights instead of the estimate from the two above.
    slots_per_layer: fewer expert slots than the budget holds (for sweeps); more raises.
    device: the GPU side; default the current CUDA device, else the CPU (standing in, for tests).
    cost_model: the miss costs; default measured when the model is accelerated.
    zero_copy: decode steps of up to `zero_copy_max_tokens` sequences run every routed expert in the
        fused kernels on the GPU, reading cached experts from their slots and the others straight from
        pinned host memory over PCIe (unified virtual addressing): no routing to the host, no fetch, no
        CPU expert, no sync, so decode steps replay CUDA graphs. Prefill (and larger decode batches)
        run the cache as above and fill its slots. Layouts without expert biases only; FP8 experts on GPUs
        of compute capability 8.9 or later. None (default): on for a CUDA device and experts it can read
        (docs/BENCHMARKS.md, "Offload", has its figures).
    zero_copy_max_tokens: the largest decode batch `zero_copy` serves. One token reads each of its
        experts once; more tokens read each expert they share once (the grouped kernels).
    zero_copy_refill_every: every this many zero-copy decode steps, each layer's most used experts
        that aren't cached (counted on the GPU, graph replays included) are copied into the slots of
        its least used ones, at most top-k a layer; 0 (default): the slots stay as the last prefill
        forward left them. Experimental: tokens equal eager decoding; see docs/BENCHMARKS.md for its speed.
    host_dtype: None (default): misses computed on the CPU read the experts' full-precision host copy.
        "int4" (lossy): they read group-wise int4 copies made at accelerate() time (`host_int4`: groups
        of 32 along the input dim, asymmetric, float32 scale and min) kept beside the full-precision
        copy, which fetches still copy into the slots (the slots keep full precision). Zero-copy reads
        host copies in GPU kernels that read no int4, so zero_copy=True is refused with it (None
        resolves to off), as is miss_policy="fetch" (no miss would read it); full-precision experts only.
    miss_drop_threshold: None (default) or a number in [0, 1) (lossy): per token, a chosen expert that
        is a miss (in no slot) and whose normalised routing weight is under it is dropped for that
        token, the largest always kept, the kept weights renormalised as the family's router does
        (`expert_threshold`'s rule, `miss_drop`); 0 drops nothing. Counted as stats' miss_dropped. It
        needs fused routers.
    """

    eviction: str | PolicyFactory = "lfu"
    miss_policy: MissPolicy = "auto"
    prefetch: bool = True
    prefetch_experts: int | None = None
    prefetch_min_accuracy: float = 0.5
    kv_cache_tokens: int = 8192
    prefill_tokens: int = 4096
    reserve: str | int | None = None
    slots_per_layer: int | None = None
    device: str | torch.device | None = None
    cost_model: MissCostModel | None = field(default=None, compare=False)
    zero_copy: bool | None = None
    zero_copy_max_tokens: int = ZERO_COPY_MAX_BATCH
    zero_copy_refill_every: int = 0
    host_dtype: HostDtype | None = None
    miss_drop_threshold: float | None = None

    def validate(self) -> None:
        policy_factory(self.eviction)
        if self.host_dtype is not None and self.host_dtype not in HOST_DTYPES:
            raise ValueError(f"host_dtype must be None or one of {', '.join(map(repr, HOST_DTYPES))}, got {self.host_dtype!r}")
        if self.host_dtype is not None and self.miss_policy == "fetch":
            raise ValueError(f"host_dtype={self.host_dtype!r} serves the misses computed on the CPU, and miss_policy='fetch' computes none there")
        check_miss_drop_threshold(self.miss_drop_threshold)
        if self.miss_policy not in MISS_POLICIES:
            raise ValueError(f"miss_policy must be one of {', '.join(MISS_POLICIES)}, got {self.miss_policy!r}")
        for name in ("kv_cache_tokens", "prefill_tokens", "zero_copy_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        refill = self.zero_copy_refill_every
        if isinstance(refill, bool) or not isinstance(refill, int) or refill < 0:
            raise ValueError(f"zero_copy_refill_every must be an int >= 0, got {refill!r}")
        if self.prefetch_experts is not None and (not isinstance(self.prefetch_experts, int) or self.prefetch_experts < 0):
            raise ValueError(f"prefetch_experts must be an int >= 0 or None, got {self.prefetch_experts!r}")
        accuracy = self.prefetch_min_accuracy
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
            raise ValueError(f"prefetch_min_accuracy must be a number in [0, 1], got {accuracy!r}")
        if self.zero_copy not in (None, True, False):
            raise TypeError(f"zero_copy must be True, False or None (auto), got {self.zero_copy!r}")
        if self.cost_model is not None and not isinstance(self.cost_model, MissCostModel):
            raise TypeError(f"cost_model must be a MissCostModel, got {type(self.cost_model).__name__}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        if not torch.cuda.is_available():
            logger.warning("hf_moe_accel: no CUDA device; the CPU stands in for the GPU side of the offload (no speed-up)")
            return torch.device("cpu")
        device = "cuda"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"OffloadOptions.device {device!r} is not a device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"OffloadOptions.device={device} but CUDA is not available; device='cpu' runs the CPU stand-in")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"OffloadOptions.device={device}: there are {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"OffloadOptions.device must be a CUDA device or 'cpu', got {device}")
    return device


@dataclass
class OffloadSetup:
    """What `apply_offload` will do, decided (and validated) before the model is touched."""

    budget: SlotBudget
    device: torch.device
    options: OffloadOptions
    experts: list[tuple[str, nn.Module]]
    activation_dtype: torch.dtype  # what the model computes in (FP8 experts' CPU work and calibration run in it)

    @property
    def expert_tensor_names(self) -> dict[nn.Module, list[str]]:
        """Each experts module's parameter names of its expert tensors, read now: expert_dtype replaces
        the parameters (and adds the scales) between `prepare_offload` and `apply_offload`."""
        return {module: _expert_tensor_names(module) for _, module in self.experts}

    @property
    def caches_every_expert(self) -> bool:
        """The budget holds every expert and the user left the slot count to us: an expert cache
        would only add its per-layer host round trips (and rule out graph decode)."""
        return self.options.slots_per_layer is None and self.budget.slots == self.budget.num_experts


def _expert_tensor_names(module: nn.Module) -> list[str]:
    tensors = expert_tensors(expert_weights(module, Activation()))
    return [n for n, p in module._parameters.items() if any(p is t for t in tensors)]


def _quantized_layout(weights: ExpertWeights, block_size: tuple[int, int]) -> ExpertWeights:
    """`weights` as `expert_dtype="fp8"` will store them (`quantize_blocks`' shapes): float8 gate_up and
    down with float32 scales per block, biases as they are; meta tensors, for their sizes only."""
    def stored(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=FP8_DTYPE, device="meta")

    def scale(t: torch.Tensor) -> torch.Tensor:
        grid = (-(-t.shape[1] // block_size[0]), -(-t.shape[2] // block_size[1]))
        return torch.empty((t.shape[0], *grid), dtype=torch.float32, device="meta")

    return dataclasses.replace(weights, gate_up=stored(weights.gate_up), down=stored(weights.down),
                               scales=BlockScales(scale(weights.gate_up), scale(weights.down), block_size))


def _offloaded_weights(module: nn.Module, expert_dtype: ExpertDtype | None) -> ExpertWeights:
    """A layer's experts as offload will hold them: as stored now, or in the FP8 layout where expert_dtype
    will quantize them (patch_model's rule: weights not float8 already, and not Transformers' FP8Experts)."""
    weights = expert_weights(module, Activation())
    if expert_dtype != "fp8" or is_fp8_experts(module) or not needs_quantizing(module):
        return weights
    return _quantized_layout(weights, BLOCK_SIZE)


def _activation_dtype(model: nn.Module, expert_ids: set[int]) -> torch.dtype:
    """The dtype the model computes in: that of most of its non-expert floating-point parameters (float8
    storage aside: FP8 linears compute in the activations' dtype too)."""
    counts: Counter[torch.dtype] = Counter()
    for p in model.parameters():
        if id(p) not in expert_ids and p.is_floating_point() and p.element_size() > 1:
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.get_default_dtype()


def _zero_copy_problem(device: torch.device, layer_weights: list[ExpertWeights]) -> str | None:
    """Why zero-copy decode can't read these experts on `device`, or None. Its kernels run in Triton,
    which loads float8 only on GPUs of compute capability 8.9 and later (the CPU stand-in runs Triton's
    interpreter, which reads float8 anywhere)."""
    if any(w.gate_up_bias is not None or w.down_bias is not None for w in layer_weights):
        return "zero_copy reads experts without biases"
    fp8 = any(w.scales is not None for w in layer_weights)
    if fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"zero_copy reads FP8 experts on GPUs of compute capability 8.9 or later, and {device} is below"
    return None


def prepare_offload(model: nn.Module, gpu_memory: str | int, options: OffloadOptions | None = None,
                    expert_dtype: ExpertDtype | None = None) -> OffloadSetup:
    """Validate the budget and options and split the budget; raises ValueError/TypeError, changes nothing.
    `expert_dtype`: what `accelerate()` will quantize the experts to before offloading them (their
    slots and host copies are sized as stored then)."""
    options = OffloadOptions() if options is None else options
    if not isinstance(options, OffloadOptions):
        raise TypeError(f"offload must be an OffloadOptions, got {type(options).__name__}")
    options.validate()
    budget_bytes = parse_memory_size(gpu_memory)
    device = _resolve_device(options.device)
    experts = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
    if not experts:
        raise ValueError(f"gpu_memory offloads MoE experts, and {type(model).__name__} has no MoE block")
    expert_ids = {id(t) for _, module in experts for t in expert_tensors(expert_weights(module, Activation()))}
    seen = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in expert_ids:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    activation_dtype = _activation_dtype(model, expert_ids)
    layer_weights = [_offloaded_weights(m, expert_dtype) for _, m in experts]
    if options.reserve is not None:
        reserve = parse_memory_size(options.reserve)
    else:
        reserve = reserve_bytes(
            model.config, compute_dtype(layer_weights[0], activation_dtype), kv_cache_tokens=options.kv_cache_tokens,
            prefill_tokens=options.prefill_tokens, expert_inner=max(w.intermediate_size for w in layer_weights),
        )
    budget = split_budget(budget_bytes, sum(seen.values()), reserve, [bytes_per_expert(w) for w in layer_weights],
                          [w.num_experts for w in layer_weights], options.slots_per_layer)
    if options.miss_policy == "fetch" and min(budget.slots) == 0:
        raise ValueError(f"miss_policy='fetch' needs at least one expert slot per layer; {budget.describe()}")
    zero_copy_problem = _zero_copy_problem(device, layer_weights)
    if options.host_dtype is not None:
        problem = next(filter(None, map(int4_problem, layer_weights)), None)
        if problem:
            raise ValueError(f"{problem} ({type(model).__name__})")
        # The zero-copy kernels read host copies as stored; none reads int4.
        zero_copy_problem = zero_copy_problem or f"zero_copy reads no host_dtype={options.host_dtype!r} copies: set zero_copy=False"
    if options.zero_copy and zero_copy_problem:
        raise ValueError(f"{zero_copy_problem}; {type(model).__name__}'s experts can't be read that way")
    if options.zero_copy is None:  # auto: on for CUDA and experts it can read
        options = dataclasses.replace(options, zero_copy=device.type == "cuda" and zero_copy_problem is None)
    return OffloadSetup(budget, device, options, experts, activation_dtype)


def _check_planned_size(name: str, host: ExpertWeights, planned: int) -> None:
    """The experts found at apply time must be the size the budget was split for (expert_dtype's FP8
    layout predicted in `prepare_offload`): otherwise the slots would overrun the budget."""
    if bytes_per_expert(host) != planned:
        raise RuntimeError(f"hf_moe_accel: {name}'s experts take {bytes_per_expert(host)} bytes each, but the "
                           f"gpu_memory budget was split for {planned}")


class OffloadEngine(RefusesCopies):
    """The offload state of one model: layers with their caches, the copy lane, the CPU worker, counters.
    Neither it nor its layers can be pickled or deep-copied (`layer.NOT_COPYABLE` says why and what to do);
    the model reaches them through its forward pre-hook, its experts' forwards and its state."""

    def __init__(self, model: nn.Module, setup: OffloadSetup, placement: WeightPlacement) -> None:
        self.setup = setup
        self.placement = placement
        self.routed_modules: list[nn.Module] = []  # experts modules whose forward is ours
        # Their configs: an offloaded layer runs whatever these name, so they must keep naming ours.
        self.experts_configs = tuple({id(module.config): module.config for _, module in setup.experts}.values())
        self.phase_hook = None
        self.saved_device_map = None
        self.options = setup.options
        self.device = setup.device
        self.miss_policy: MissPolicy = setup.options.miss_policy
        self.zero_copy = setup.options.zero_copy  # `set_zero_copy` switches it
        self.phase = "prefill"
        self.lanes = DeviceLanes(setup.device)
        self.cpu_worker = CpuExpertsWorker()
        make_policy = policy_factory(setup.options.eviction)
        # Lossy options (off by default): 0 drops nothing, so it runs as None does.
        self.miss_drop_threshold = float(setup.options.miss_drop_threshold or 0.0)
        renormalises = renormalisation_by_block(model) if self.miss_drop_threshold > 0 else {}
        self.layers: list[OffloadedLayer] = []
        for index, ((name, module), slots) in enumerate(zip(setup.experts, setup.budget.slots)):
            host = expert_weights(module, experts_state(module).activation)
            _check_planned_size(name, host, setup.budget.expert_bytes[index])
            cache = ExpertCache(host, slots, setup.device, make_policy(host.num_experts), by_address=self.options.zero_copy)
            router_weight, top_k = _router_of(model, name, module, host.num_experts)
            layer = OffloadedLayer(index, name, cache, router_weight, top_k, self)
            layer.host_int4 = int4_experts(host) if self.options.host_dtype == "int4" else None
            if self.miss_drop_threshold > 0:
                layer.drop_renormalises = _block_rule(renormalises, name)
            self.layers.append(layer)
        self.cost_model = setup.options.cost_model or self._calibrate()
        self.copy_clock = CopyLaneClock(self.cost_model.fetch_s if self.cost_model is not None else math.inf)
        self.cpu_correction = CpuTimeCorrection()
        self._stats = {phase: [LayerOffloadStats() for _ in self.layers] for phase in PHASES}
        # Zero-copy counters per phase and layer, counted on the device: [lookups and hits packed
        # (expert_cache.LOOKUP), experts read from host memory, missed pairs dropped (miss_drop_threshold)].
        self._zero_copy_counts = {phase: torch.zeros(len(self.layers), 3, dtype=torch.int64, device=setup.device)
                                  for phase in PHASES} if self.options.zero_copy else None
        # Zero-copy refill: routed pairs per expert (and a sentinel column) since the last refill, per layer.
        refills = self.options.zero_copy and self.options.zero_copy_refill_every > 0
        widest = max(layer.cache.num_experts for layer in self.layers) + 1  # a layer's -1 pairs land in its column E
        self._expert_use = torch.zeros(len(self.layers), widest, dtype=torch.int64, device=setup.device) if refills else None
        self._steps_since_refill = 0
        self._rehearsing = False  # inside `rehearsal()`
        self._warned_workload = False

    def _calibrate(self) -> MissCostModel:
        # A layer with slots times the fetch too; without any, every miss runs on the CPU (fetch_s inf).
        with_slots = [layer for layer in self.layers if layer.cache.num_slots > 0]
        layer = (with_slots or self.layers)[0]
        costs = calibrate_miss_costs(layer.cache, self.lanes, activation_dtype=self.setup.activation_dtype,
                                     int4=layer.host_int4)
        logger.info("hf_moe_accel: miss costs %s", costs)
        return costs

    def layer_stats(self, index: int) -> LayerOffloadStats:
        return self._stats[self.phase][index]

    def zero_copy_counter(self, index: int) -> torch.Tensor:
        """Layer `index`'s zero-copy counters for the current phase, on the device: [packed lookups and
        hits, experts read from host memory, missed pairs dropped]."""
        return self._zero_copy_counts[self.phase][index]

    def expert_use(self, index: int) -> torch.Tensor | None:
        """Layer `index`'s per-expert use counter for the zero-copy refill ([E + 1] on the device), or None."""
        return None if self._expert_use is None else self._expert_use[index]

    def before_decode_step(self) -> None:
        """Called before each decode step (the model's pre-hook for eager steps, the graph runner before a
        replay): every `zero_copy_refill_every` steps, refill the slots from the use counted since."""
        if self._expert_use is None or not self.zero_copy:
            return
        self._steps_since_refill += 1
        if self._steps_since_refill >= self.options.zero_copy_refill_every:
            self._steps_since_refill = 0
            self._refill()

    @contextlib.contextmanager
    def rehearsal(self) -> Iterator[None]:
        """Around a run of a decode step that its graph replay then repeats (a capture's warm-up, the capture):
        the step counts once, as its replay, so graph decoding refills at the same steps as eager decoding.
        No refill is due in it, and the device counters it adds to (lookups and hits, expert use) are put
        back after it (a CUDA capture adds nothing: its counting runs in the replays)."""
        counters = [*(self._zero_copy_counts or {}).values(), *([] if self._expert_use is None else [self._expert_use])]
        saved = [counter.clone() for counter in counters]
        self._rehearsing = True
        try:
            yield
        finally:
            self._rehearsing = False
            for counter, before in zip(counters, saved):
                counter.copy_(before)

    @torch.no_grad()  # slot copies of the host experts (parameters) never join an autograd graph
    def _refill(self) -> None:
        use = self._expert_use.to("cpu", copy=True)  # the one sync of a refill (a copy on the CPU stand-in too)
        self._expert_use.zero_()
        for layer, counts in zip(self.layers, use):
            cache, stats = layer.cache, self._stats["decode"][layer.index]
            counts = counts[: cache.num_experts]  # not the column of pairs without an expert
            touched = counts.nonzero().view(-1)
            if cache.num_slots == 0 or touched.numel() == 0:
                continue
            cache.policy.record(touched, counts[touched], counts[touched].double())
            ranked = touched[torch.argsort(counts[touched], descending=True, stable=True)]
            hot = ranked[: cache.num_slots]
            wanted = hot[cache.slot_of_expert[hot] < 0][: layer.top_k or None].tolist()
            slots = cache.choose_slots(len(wanted), protect=set(hot.tolist()))  # victims: experts used less
            if slots:
                stats.h2d_bytes += layer.install(list(zip(slots, wanted[: len(slots)])))
                stats.refilled += len(slots)
                self.lanes.compute_wait(cache.ready)  # the next step reads the new slots and tables
                cache.device_addresses()

    def reset_stats(self) -> None:
        self._stats = {phase: [LayerOffloadStats() for _ in self.layers] for phase in PHASES}
        if self._zero_copy_counts is not None:
            for counts in self._zero_copy_counts.values():
                counts.zero_()

    def _phase_stats(self, phase: str) -> list[LayerOffloadStats]:
        """The host's counters with the device's zero-copy ones folded in: each zero-copy lookup is a
        routed pair, and each expert read from host memory its bytes over PCIe."""
        if self._zero_copy_counts is None:
            return self._stats[phase]
        per_layer = []
        for layer, host_stats, (packed, reads, dropped) in zip(self.layers, self._stats[phase],
                                                               self._zero_copy_counts[phase].tolist()):
            lookups, hits = unpack_lookups(packed)
            per_layer.append(host_stats + LayerOffloadStats(lookups=lookups, hits=hits, miss_dropped=dropped,
                                                            h2d_bytes=reads * layer.cache.expert_bytes))
        return per_layer

    def stats(self, phase: str) -> OffloadStats:
        if phase == "all":
            phases = [self._phase_stats(p) for p in PHASES]
            per_layer = [sum((stats[i] for stats in phases), LayerOffloadStats()) for i in range(len(self.layers))]
        elif phase in PHASES:
            per_layer = self._phase_stats(phase)
        else:
            raise ValueError(f"phase must be 'all', {', '.join(repr(p) for p in PHASES)}; got {phase!r}")
        return OffloadStats(phase, {layer.name: s for layer, s in zip(self.layers, per_layer)})

    def graph_decode_blocker(self, batch_size: int, cache_tokens: int) -> str | None:
        """Why decode steps of `batch_size` sequences over a static cache of `cache_tokens` positions
        can't replay CUDA graphs, or None: only zero-copy forwards are free of host work, and the
        cache must fit the KV room the budget keeps."""
        if not self.zero_copy:
            return "expert offload with zero-copy decode off: each MoE layer exchanges routing with the host"
        if batch_size > self.options.zero_copy_max_tokens:
            return (f"expert offload at batch {batch_size}, above zero_copy_max_tokens={self.options.zero_copy_max_tokens}: "
                    "decode runs the expert cache, which exchanges routing with the host")
        if batch_size * cache_tokens > self.options.kv_cache_tokens:
            return (f"a static cache of {batch_size} x {cache_tokens} positions is more than the "
                    f"{self.options.kv_cache_tokens} tokens of KV cache the budget keeps room for (OffloadOptions.kv_cache_tokens)")
        return None

    def decode_hooks(self) -> DecodeHooks:
        """Zero-copy decode steps are free of host work, so graphs may serve them (shapes permitting);
        otherwise every MoE layer exchanges routing with the host and decode stays eager. The budget
        keeps KV room for one generation: one pooled cache at a time."""
        if not self.options.zero_copy:
            return DecodeHooks(blocked_reason="expert offload: each MoE layer exchanges routing and CPU results with the host")
        return DecodeHooks(step_blocker=self.graph_decode_blocker, before_replay=self.before_decode_step,
                           rehearsal=self.rehearsal, max_pooled_caches=1)

    def next_layer(self, index: int) -> OffloadedLayer | None:
        return self.layers[index + 1] if index + 1 < len(self.layers) else None

    def prefetch_limit(self, top_k: int) -> int:
        return top_k if self.options.prefetch_experts is None else self.options.prefetch_experts

    def zero_copy_serves(self, hidden: torch.Tensor) -> bool:
        """Whether this forward runs zero-copy (OffloadOptions.zero_copy): a decode step (prefill, however
        short, runs the cache and so fills its slots) of few enough tokens, and the kernels there to
        run it (a GPU, or Triton's interpreter standing in on CPU tensors)."""
        return (self.zero_copy and self.phase == "decode" and hidden.shape[0] <= self.options.zero_copy_max_tokens
                and (hidden.is_cuda or interpreting()))

    def check_workload(self, num_tokens: int) -> None:
        if num_tokens > self.options.prefill_tokens and self.options.reserve is None and not self._warned_workload:
            self._warned_workload = True
            logger.warning(
                "hf_moe_accel: a forward over %d tokens, more than the %d the GPU reserve was sized for "
                "(OffloadOptions.prefill_tokens): peak memory may pass the gpu_memory budget",
                num_tokens, self.options.prefill_tokens,
            )

    def set_phase(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: one new token per sequence is decode, anything else prefill."""
        self._refuse_other_experts_implementation()
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self.phase = "decode" if tokens is not None and tokens.dim() >= 2 and tokens.shape[1] == 1 else "prefill"
        if self.phase == "decode" and self._expert_use is not None:
            # a rehearsal (and any capture) is not a step of its own: the replay after it is
            if not (self._rehearsing or (tokens.is_cuda and torch.cuda.is_current_stream_capturing())):
                self.before_decode_step()

    def _refuse_other_experts_implementation(self) -> None:
        """Offloaded experts run through their OffloadedLayer (an instance-level forward, which Transformers'
        experts dispatch never reaches): a config switched to another experts implementation can't be honoured."""
        for config in self.experts_configs:
            if config._experts_implementation != EXPERTS_IMPLEMENTATION:
                raise RuntimeError(
                    f"hf_moe_accel: this model's experts are offloaded (accelerate(gpu_memory=...)) and run hf_moe_accel's "
                    f"offloaded forward, but config._experts_implementation was set to {config._experts_implementation!r}. "
                    f"Call hf_moe_accel.unpatch(model) first (it keeps that choice), or set it back with "
                    f"model.set_experts_implementation({EXPERTS_IMPLEMENTATION!r})."
                )


def _block_rule(renormalises: dict[str, bool], experts_name: str) -> bool:
    """The renormalisation rule of the MoE block holding the experts module `experts_name`."""
    block = experts_name.rsplit(".", 1)[0] if "." in experts_name else ""
    if block not in renormalises:
        raise ValueError(f"miss_drop_threshold needs the router of {experts_name}'s MoE block, and none was found")
    return renormalises[block]


def _attribute_at(module: nn.Module, path: str):
    return functools.reduce(getattr, path.split("."), module) if path else module


def _router_of(model: nn.Module, name: str, experts: nn.Module, num_experts: int) -> tuple[torch.Tensor | None, int]:
    """The router linear weight [E, H] of an experts module's block and its top-k, for prefetch; (None, 0) if not found."""
    adapter = ADAPTER_BY_MODEL_TYPE.get(getattr(getattr(experts, "config", None), "model_type", None))
    if adapter is None or "." not in name:
        return None, 0
    router = getattr(model.get_submodule(name.rsplit(".", 1)[0]), adapter.router_attr, None)
    try:
        weight = _attribute_at(router, adapter.router_linear).weight
    except AttributeError:
        return None, 0
    top_k = getattr(router, "top_k", None) or getattr(experts.config, "num_experts_per_tok", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != num_experts or not top_k:
        return None, 0
    return weight, int(top_k)


def apply_offload(model: nn.Module, setup: OffloadSetup) -> DecodeHooks:
    """Place the weights, allocate the slots, route every experts module through its OffloadedLayer;
    returns what graph decode must know of it (`enable_graph_decode(..., hooks=...)`).
    All or nothing: on an error everything done so far is undone."""
    placement = WeightPlacement(model, setup.expert_tensor_names, setup.device, pin=setup.device.type == "cuda")
    engine = None
    try:
        engine = OffloadEngine(model, setup, placement)
        for (_, module), layer in zip(setup.experts, engine.layers):
            if "forward" in module.__dict__:
                raise ValueError(f"{type(module).__name__} has an instance-level forward already; can't offload it")
            # An instance attribute, above the patched class's forward, so unpatching stays independent.
            module.forward = functools.partial(layer.forward, module)
            engine.routed_modules.append(module)
        engine.phase_hook = model.register_forward_pre_hook(engine.set_phase, with_kwargs=True)
        engine.saved_device_map = model.__dict__.get("hf_device_map")
        model.hf_device_map = {"": str(setup.device), **{name: "cpu" for name, _ in setup.experts}}
        ensure_state(model).offload = engine
    except BaseException:
        if engine is not None:
            _undo(model, engine)
        else:
            placement.restore()
        raise
    logger.info("hf_moe_accel: expert offload on %s, %s", setup.device, setup.budget.describe())
    return engine.decode_hooks()


def _undo(model: nn.Module, engine: OffloadEngine) -> None:
    for module in engine.routed_modules:
        del module.__dict__["forward"]
    if engine.phase_hook is not None:
        engine.phase_hook.remove()
    if "hf_device_map" in model.__dict__:
        if engine.saved_device_map is None:
            del model.__dict__["hf_device_map"]
        else:
            model.hf_device_map = engine.saved_device_map
    state = state_of(model)
    if state is not None and state.offload is engine:
        state.offload = None
        drop_state_if_empty(model)
    engine.lanes.synchronize()
    engine.cpu_worker.shutdown()
    for layer in engine.layers:
        layer.cache.slots = None
    engine.placement.restore()


def remove_offload(model: nn.Module) -> None:
    """Undo `apply_offload`: slots freed, every tensor back on its device, hooks as they were."""
    engine = _engine_or_none(model)
    if engine is not None:
        _undo(model, engine)


def _engine_or_none(model: nn.Module) -> OffloadEngine | None:
    state = state_of(model)
    return None if state is None else state.offload


def offload_engine(model: nn.Module) -> OffloadEngine:
    """The offload engine of a model accelerated with gpu_memory=... (ValueError otherwise)."""
    engine = _engine_or_none(model)
    if engine is None:
        raise ValueError(f"{type(model).__name__} has no expert offload: accelerate it with gpu_memory=...")
    return engine


def is_offloaded(model: nn.Module) -> bool:
    return _engine_or_none(model) is not None


def decode_hooks(model: nn.Module) -> DecodeHooks:
    """What graph decode must know of an offloaded model (the hooks `apply_offload` returned)."""
    return offload_engine(model).decode_hooks()


def offload_stats(model: nn.Module, phase: str = "all") -> OffloadStats:
    """Hit rate, fetches, CPU experts, PCIe bytes and CPU expert time, per MoE layer and in total,
    since accelerate() or the last reset; `phase` is "all", "prefill" or "decode"."""
    return offload_engine(model).stats(phase)


def reset_offload_stats(model: nn.Module) -> None:
    offload_engine(model).reset_stats()


def offload_budget(model: nn.Module) -> SlotBudget:
    """How the budget was split: non-expert weights, reserve, slots per layer."""
    return offload_engine(model).setup.budget


def offload_options(model: nn.Module) -> OffloadOptions:
    """The options the offload runs with, defaults resolved (zero_copy True or False)."""
    return offload_engine(model).options


def offload_miss_costs(model: nn.Module) -> MissCostModel | None:
    """The miss costs the engine decides with (measured at accelerate() time, or given)."""
    return offload_engine(model).cost_model


def set_miss_policy(model: nn.Module, policy: MissPolicy) -> None:
    """Switch an offloaded model's miss policy ("auto", "fetch", "cpu") in place, e.g. to compare them."""
    engine = offload_engine(model)
    if policy not in MISS_POLICIES:
        raise ValueError(f"miss policy must be one of {', '.join(MISS_POLICIES)}, got {policy!r}")
    if policy == "fetch" and min(engine.setup.budget.slots) == 0:
        raise ValueError("miss policy 'fetch' needs at least one expert slot per layer")
    engine.miss_policy = policy


def set_zero_copy(model: nn.Module, enabled: bool) -> None:
    """Switch zero-copy decode (OffloadOptions.zero_copy) off or back on in place, e.g. to compare; on
    needs a model offloaded with zero_copy=True (the caches then keep their address tables)."""
    engine = offload_engine(model)
    if enabled and not engine.options.zero_copy:
        raise ValueError("zero-copy decode needs the model offloaded with OffloadOptions(zero_copy=True)")
    engine.zero_copy = bool(enabled)


__all__ = [
    "decode_hooks",
    "OffloadOptions",
    "apply_offload",
    "is_offloaded",
    "offload_engine",
    "offload_miss_costs",
    "offload_options",
    "offload_budget",
    "offload_stats",
    "prepare_offload",
    "remove_offload",
    "reset_offload_stats",
    "set_miss_policy",
    "set_zero_copy",
]
