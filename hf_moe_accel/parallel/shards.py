"""Which part of each tensor a rank keeps under expert or tensor parallel.

A rank gets its share in one of two ways: `distributed.py` cuts it out of a model every rank loaded
whole, and `loading.py` reads only it from the checkpoint's files. Both ask `shard_layout` here, so
both give the same tensors. The layout is decided from the model's modules and full shapes alone, so
it works on a meta-device model built from the config, before any weight is read.

- expert parallel: each MoE layer's experts in contiguous ranges over the ranks (the first ranks
  take the remainder); everything else whole.
- tensor parallel: query heads, KV heads (or the one a rank's queries read, when there are fewer KV
  heads than ranks) and each expert's inner dimension split; the q/k norms that span every head
  split with them; a bias added after an all-reduce (o_proj's, the experts' down bias) kept by rank
  0 alone, zeros on the others.
- block-scaled FP8 weights (FP8Experts, experts `expert_dtype="fp8"` quantized, Transformers'
  FP8Linear): a weight's float32 block scales (`<weight>_scale_inv`, one per block of the stored
  matrix) are cut with it, block for block. Expert parallel never cuts inside an expert, so every
  expert keeps its scales whole. Tensor parallel cuts each expert's inner dimension on whole blocks
  (`split_blocks`: the blocks, not the columns, are split over the ranks, the first ranks taking the
  remainder), because a cut inside a block would give two ranks one scale for rows quantized
  together, and requantizing a rank's part would change the weights one process runs. A model whose
  blocks can't follow the cut (fewer blocks than ranks, gate and up rows sharing a block, attention
  heads narrower than a block) is refused, naming parallel='ep'.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..costmodel.shapes import ModelShape, is_qkvo_attention, shape_of_model
from ..kernels.spec import is_experts_module
from ..patches.experts import block_scales, gate_up_name
from ..patches.fp8_experts import is_fp8_experts
from ..state import ensure_state, state_of

SHARDED_KINDS = ("ep", "tp")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
Block = tuple[int, int]  # (rows, columns) of one scale block over the last two axes of a stored weight


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `size` items in `parts` contiguous parts, the first ones larger."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split_blocks(size: int, block: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `size` items, as whole blocks of `block` (the last one may be
    partial), are split by `split_range`; with a block of 1, `split_range` itself."""
    start, end = split_range(-(-size // block), parts, index)
    return start * block, min(end * block, size)


def tensor_parallel_heads(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's [start, end) of query heads and of KV heads; ValueError when they don't split."""
    if num_heads % world:
        raise ValueError(f"tensor parallel over {world} ranks needs the {num_heads} attention heads to split evenly; use parallel='ep'")
    per_rank = num_heads // world
    q = (rank * per_rank, (rank + 1) * per_rank)
    if num_kv_heads % world == 0:
        kv_per_rank = num_kv_heads // world
        return q, (rank * kv_per_rank, (rank + 1) * kv_per_rank)
    if world % num_kv_heads == 0:  # fewer KV heads than ranks: each rank keeps the one its queries read
        kv = q[0] // (num_heads // num_kv_heads)
        return q, (kv, kv + 1)
    raise ValueError(
        f"tensor parallel over {world} ranks can't split (or evenly replicate) {num_kv_heads} KV heads; use parallel='ep'"
    )


@dataclass(frozen=True)
class TensorSlice:
    """A rank's part of one tensor: the `ranges` of axis `axis`, concatenated in order (two ranges
    for a concatenated gate/up projection); with `zeros`, a tensor of zeros of the full shape."""

    axis: int
    ranges: tuple[tuple[int, int], ...] = ()
    zeros: bool = False

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.zeros:
            return tuple(shape)
        local = list(shape)
        local[self.axis] = sum(end - start for start, end in self.ranges)
        return tuple(local)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This part of a full tensor (a view where one range suffices)."""
        if self.zeros:
            return torch.zeros_like(tensor)
        pieces = [tensor.narrow(self.axis, start, end - start) for start, end in self.ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.axis)


@dataclass(frozen=True)
class AttentionShard:
    """A tensor-parallel rank's heads of one attention module."""

    heads: tuple[int, int]  # [start, end) of query heads
    kv_heads: tuple[int, int]
    split_norms: tuple[tuple[str, int], ...]  # (attribute, full width) of the q/k norms spanning every head


@dataclass(frozen=True)
class ShardLayout:
    """What one rank keeps of a model under `kind` ("ep" or "tp") over `world` ranks."""

    kind: str
    rank: int
    world: int
    slices: Mapping[str, TensorSlice]  # parameter name -> this rank's part; a name not here is kept whole
    full_shapes: Mapping[str, tuple[int, ...]]  # parameter name -> its full shape, for the names in `slices`
    expert_ranges: Mapping[str, tuple[int, int]]  # experts module name -> [start, end) of its experts this rank keeps (ep)
    attention: Mapping[str, AttentionShard]  # attention module name -> its heads on this rank (tp)
    model_shape: ModelShape  # the whole model's sizes, for the cost model

    def local_shape(self, name: str, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        part = self.slices.get(name)
        return tuple(full_shape) if part is None else part.local_shape(full_shape)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if any(n in type(m).__name__ for n in ("Attention", "Attn")) and hasattr(m, "o_proj")]


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def shard_layout(model: nn.Module, kind: str, rank: int, world: int, *, quantize_block: Block | None = None) -> ShardLayout:
    """This rank's part of every tensor of `model` (loaded, or on the meta device) under `kind`.

    `quantize_block`: experts that `expert_dtype` will quantize in these blocks are cut as if they were
    (`accelerate()` checks the cut before it quantizes; their scales don't exist yet, so none is listed).
    Raises ValueError, before anything is read or changed, for a model the plan can't split."""
    if kind not in SHARDED_KINDS:
        raise ValueError(f"shard layouts are for parallel='ep' or 'tp', not {kind!r}")
    slices: dict[str, TensorSlice] = {}
    expert_ranges: dict[str, tuple[int, int]] = {}
    attention: dict[str, AttentionShard] = {}
    experts = experts_modules(model)
    for name, module in experts:
        declared = getattr(module, "num_experts", None)
        if isinstance(declared, int) and _num_experts(module) != declared:
            raise ValueError(
                f"{name} holds {_num_experts(module)} of its {declared} experts: this model is already one rank's share "
                "(load_for_rank; a copy of it loses that mark), so it can't be split again: accelerate the model "
                "load_for_rank returned"
            )
    if kind == "ep":
        _expert_parallel(experts, world, rank, slices, expert_ranges)
    else:
        _tensor_parallel(model, experts, world, rank, slices, expert_ranges, attention, quantize_block)
    params = dict(model.named_parameters())
    return ShardLayout(
        kind=kind, rank=rank, world=world, slices=slices,
        full_shapes={name: tuple(params[name].shape) for name in slices},
        expert_ranges=expert_ranges, attention=attention, model_shape=shape_of_model(model),
    )


def _num_experts(experts: nn.Module) -> int:
    return (experts.gate_up_proj if experts.has_gate else experts.up_proj).shape[0]


def _expert_parallel(experts, world: int, rank: int, slices: dict, expert_ranges: dict) -> None:
    fewest = min((_num_experts(m) for _, m in experts), default=0)
    if fewest < world:
        raise ValueError(f"expert parallel over {world} ranks needs at least {world} experts per layer; this model has {fewest}")
    for name, module in experts:
        start, end = split_range(_num_experts(module), world, rank)
        expert_ranges[name] = (start, end)
        # Every per-expert tensor on its first axis: weights, biases, and FP8 block scales alike (a scale
        # block never spans two experts).
        for pname, _ in module.named_parameters(recurse=False):
            slices[f"{name}.{pname}"] = TensorSlice(0, ((start, end),))


def _tensor_parallel(model, experts, world: int, rank: int, slices: dict, expert_ranges: dict, attention: dict,
                     quantize_block: Block | None) -> None:
    config = model.config.get_text_config()
    attentions = attention_modules(model)
    unsupported = sorted({type(a).__name__ for _, a in attentions if not is_qkvo_attention(a)})
    if unsupported or not attentions:
        what = ", ".join(unsupported) or "no attention module found"
        raise ValueError(f"tensor parallel shards q/k/v/o attention; {what} has another layout: use parallel='ep'")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    tensor_parallel_heads(num_heads, num_kv_heads, world, rank)
    for name, module in experts:
        _experts_inner(name, module, world, rank, slices, expert_ranges, _planned_block(module, quantize_block))
    for name, module in attentions:
        attention[name] = _attention_heads(name, module, num_heads, num_kv_heads, world, rank, slices)


def _experts_inner(name: str, experts: nn.Module, world: int, rank: int, slices: dict, expert_ranges: dict,
                   block: Block | None) -> None:
    """Columns [start, end) of each expert's inner dimension, in the module's own layout; with block
    scales, cut on whole blocks (`inner_step`) and the scales cut with their weights."""
    transposed, interleaved = experts.is_transposed, not experts.is_concatenated
    size = experts.down_proj.shape[-2] if transposed else experts.down_proj.shape[-1]
    step = inner_step(experts, block)
    blocks = -(-size // step)
    if step == 1 and size < world:
        raise ValueError(f"expert inner size {size} is smaller than {world} ranks; use parallel='ep'")
    gate_up_rows = block[1 if transposed else 0] if block is not None else 1  # a block's extent along the 2I axis
    if experts.has_gate and not interleaved and size % gate_up_rows:
        raise ValueError(
            f"tensor parallel can't split {name}'s FP8 experts: their inner size {size} isn't a multiple of the "
            f"{gate_up_rows}-row scale block, so gate and up rows share blocks that no cut can separate; use parallel='ep'"
        )
    if blocks < world:
        fewer = f", or at most {blocks} ranks" if blocks > 1 else ""
        raise ValueError(
            f"tensor parallel over {world} ranks cuts FP8 experts on whole scale blocks, and {name}'s inner size "
            f"{size} is {blocks} block{'s' if blocks > 1 else ''} of {step} columns, fewer than the ranks; use "
            f"parallel='ep' (whole experts per rank){fewer}"
        )
    start, end = split_blocks(size, step, world, rank)
    expert_ranges[name] = (start, end)
    if not experts.has_gate:
        gate_up = ((start, end),)
    elif interleaved:  # gate0, up0, gate1, up1, ...
        gate_up = ((2 * start, 2 * end),)
    else:  # all gate rows, then all up rows
        gate_up = ((start, end), (size + start, size + end))
    first = gate_up_name(experts)
    gate_up_axis = 2 if transposed else 1  # the 2I (or I) axis of [E, H, 2I] or [E, 2I, H]
    _cut(slices, name, experts, first, TensorSlice(gate_up_axis, gate_up), block)
    _cut(slices, name, experts, "down_proj", TensorSlice(1 if transposed else 2, ((start, end),)), block)
    if experts.has_bias:
        slices[f"{name}.{first}_bias"] = TensorSlice(1, gate_up)
        if rank:  # added once, by rank 0: the all_reduce sums the ranks' partial outputs
            slices[f"{name}.down_proj_bias"] = TensorSlice(0, zeros=True)


def inner_step(experts: nn.Module, block: Block | None) -> int:
    """The columns of an expert's inner dimension that a tensor-parallel cut must keep together: 1 for
    plain weights; with block scales, the blocks' extent along the inner axis of down and of gate/up
    (whose interleaved rows hold a gate and an up row per column), their least common multiple."""
    if block is None:
        return 1
    rows, cols = block
    down, gate_up = (rows, cols) if experts.is_transposed else (cols, rows)
    if experts.has_gate and not experts.is_concatenated:
        gate_up //= math.gcd(gate_up, 2)
    return math.lcm(down, gate_up)


def block_size(module: nn.Module) -> Block | None:
    """The block of the float32 scales (`<weight>_scale_inv`) beside `module`'s float8 weights: FP8Experts,
    experts `expert_dtype` quantized, Transformers' FP8Linear; None for weights without block scales
    (plain weights, per-tensor scales)."""
    if is_experts_module(module):
        scales = block_scales(module)
        return None if scales is None else scales.block_size
    weight, scale = module._parameters.get("weight"), module._parameters.get("weight_scale_inv")
    block = getattr(module, "block_size", None)
    if weight is None or scale is None or weight.dtype not in FLOAT8_DTYPES or scale.dim() != 2 or block is None:
        return None
    return int(block[0]), int(block[1])


def _planned_block(experts: nn.Module, quantize_block: Block | None) -> Block | None:
    """The experts' block: their own, or `quantize_block` where `expert_dtype` will quantize them (plain
    weights outside FP8Experts, which keep the weights their quantizer left unquantized)."""
    current = block_size(experts)
    if current is not None or quantize_block is None or is_fp8_experts(experts):
        return current
    return quantize_block


def scale_slice(name: str, part: TensorSlice, shape: tuple[int, ...], block: Block) -> TensorSlice:
    """The part of `name`'s block scales that goes with `part` of the weight (full `shape`): the same axis,
    counted in blocks. ValueError where a cut falls inside a block (a rank's scales would also cover
    another rank's rows), or where a range other than the last ends in a partial block (the next range's
    rows would sit under the wrong local block)."""
    axis = part.axis % len(shape)
    if part.zeros or axis < len(shape) - 2:  # a leading axis (experts) holds whole blocks
        return part
    width, full = block[axis - (len(shape) - 2)], shape[axis]
    ranges = []
    for index, (start, end) in enumerate(part.ranges):
        partial_end_ok = index == len(part.ranges) - 1 and end == full
        for cut in (start, end):
            if cut % width and not (cut == end and partial_end_ok):
                raise ValueError(
                    f"tensor parallel would cut {name} at {cut} of {full} along axis {axis}, inside a {width}-wide FP8 "
                    "scale block, so the ranks' block scales can't follow their weights; use parallel='ep'"
                )
        ranges.append((start // width, -(-end // width)))
    return TensorSlice(axis, tuple(ranges))


def _cut(slices: dict, module_name: str, module: nn.Module, attr: str, part: TensorSlice, block: Block | None) -> None:
    """`part` of `module.<attr>`, and with block scales the same blocks of `<attr>_scale_inv` (checked
    against the block even where the scales don't exist yet: experts `expert_dtype` will quantize)."""
    name = f"{module_name}.{attr}"
    slices[name] = part
    if block is None:
        return
    scales = scale_slice(name, part, tuple(getattr(module, attr).shape), block)
    if isinstance(module._parameters.get(f"{attr}_scale_inv"), torch.Tensor):
        slices[f"{name}_scale_inv"] = scales


def check_share_quantizable(model: nn.Module, layout: ShardLayout, block: Block) -> None:
    """ValueError unless quantizing the plain experts of this loaded share in `block` blocks gives the
    blocks one process quantizes: every tensor-parallel cut of their weights on a block boundary."""
    for name in layout.expert_ranges:
        experts = model.get_submodule(name)
        if block_size(experts) is not None or _planned_block(experts, block) is None:
            continue  # already block-scaled (cut with its scales), or not quantized
        for attr in (gate_up_name(experts), "down_proj"):
            key = f"{name}.{attr}"
            if key in layout.slices:
                scale_slice(key, layout.slices[key], layout.full_shapes[key], block)


def _attention_heads(name: str, module: nn.Module, num_heads: int, num_kv_heads: int, world: int, rank: int, slices: dict) -> AttentionShard:
    head_dim = getattr(module, "head_dim", None)
    widths = (module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features, module.o_proj.in_features)
    if head_dim is None or widths != (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim, num_heads * head_dim):
        # e.g. a q_proj that also emits a gate (Qwen3-Next): its rows aren't one block per head
        raise ValueError(f"tensor parallel can't split {type(module).__name__}: its projections aren't one block per head; use parallel='ep'")
    (q0, q1), (k0, k1) = tensor_parallel_heads(num_heads, num_kv_heads, world, rank)
    q_rows, kv_rows = ((q0 * head_dim, q1 * head_dim),), ((k0 * head_dim, k1 * head_dim),)
    for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        linear = getattr(module, proj)
        _cut(slices, f"{name}.{proj}", linear, "weight", TensorSlice(0, rows), block_size(linear))
        if linear.bias is not None:
            slices[f"{name}.{proj}.bias"] = TensorSlice(0, rows)
    _cut(slices, f"{name}.o_proj", module.o_proj, "weight", TensorSlice(1, q_rows), block_size(module.o_proj))
    if module.o_proj.bias is not None and rank:  # added once, by rank 0: the all_reduce sums the partial outputs
        slices[f"{name}.o_proj.bias"] = TensorSlice(0, zeros=True)
    if module._parameters.get("sinks") is not None:  # GPT-OSS: one learned sink logit per head
        slices[f"{name}.sinks"] = TensorSlice(0, ((q0, q1),))
    split_norms = []
    for norm_name, rows, full in (("q_norm", q_rows, num_heads * head_dim), ("k_norm", kv_rows, num_kv_heads * head_dim)):
        norm = getattr(module, norm_name, None)
        if norm is None or getattr(norm, "weight", None) is None or norm.weight.numel() != full:
            continue  # absent, or per head (kept whole)
        if not _t5_rms_norm_matches(norm):
            raise ValueError(
                f"tensor parallel can't split {type(module).__name__}.{norm_name} ({type(norm).__name__}), a norm over all "
                "heads of a kind it doesn't know; use parallel='ep'"
            )
        slices[f"{name}.{norm_name}.weight"] = TensorSlice(0, rows)
        split_norms.append((norm_name, full))
    return AttentionShard((q0, q1), (k0, k1), tuple(split_norms))


def _t5_rms_norm_matches(norm: nn.Module) -> bool:
    """Whether `norm` computes `weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)`, the formula
    of `distributed.ShardedRMSNorm` (checked on a random input on the CPU; a meta-device norm is
    checked on a CPU copy with random weights)."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None or weight.dim() != 1:
        return False
    if weight.device.type == "meta":
        norm = copy.deepcopy(norm).to_empty(device="cpu")
        with torch.no_grad():
            norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        weight = norm.weight
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return torch.allclose(norm(x), expected, rtol=1e-3, atol=1e-3)


# ---- models loaded as one rank's share ------------------------------------------------------

def mark_loaded_shard(model: nn.Module, layout: ShardLayout) -> None:
    """Record that `model` holds one rank's share (in its state's `shard` field: it outlives unpatch)."""
    ensure_state(model).shard = layout


def loaded_shard(model: nn.Module) -> ShardLayout | None:
    """The layout of the share `model` was loaded with (`load_for_rank`), or None for a whole model."""
    state = state_of(model)
    return None if state is None else state.shard


def check_loaded_shard(model: nn.Module, layout: ShardLayout, kind: str, rank: int, world: int) -> None:
    """ValueError unless `model` holds exactly `layout`'s share for `kind` on `rank` of `world`."""
    if (layout.kind, layout.world) != (kind, world) or layout.rank != rank:
        raise ValueError(
            f"{type(model).__name__} was loaded as rank {layout.rank}'s share for parallel={layout.kind!r} over "
            f"{layout.world} ranks (load_for_rank); this is rank {rank} of {world} asking for parallel={kind!r}: "
            "load it for the plan and ranks it will run on"
        )
    params = dict(model.named_parameters())
    wrong = [f"{name} {tuple(params[name].shape)} (expected {layout.local_shape(name, full)})"
             for name, full in layout.full_shapes.items()
             if name not in params or tuple(params[name].shape) != layout.local_shape(name, full)]
    if wrong:
        raise ValueError(f"{type(model).__name__} no longer holds the share it was loaded with: {', '.join(wrong[:3])}")
