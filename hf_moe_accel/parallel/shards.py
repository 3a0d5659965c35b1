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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..costmodel.shapes import ModelShape, is_qkvo_attention, shape_of_model
from ..kernels.spec import is_experts_module
from ..state import ensure_state, state_of

SHARDED_KINDS = ("ep", "tp")


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `size` items in `parts` contiguous parts, the first ones larger."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


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


def shard_layout(model: nn.Module, kind: str, rank: int, world: int) -> ShardLayout:
    """This rank's part of every tensor of `model` (loaded, or on the meta device) under `kind`.

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
        _tensor_parallel(model, experts, world, rank, slices, expert_ranges, attention)
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
        for pname, _ in module.named_parameters(recurse=False):
            slices[f"{name}.{pname}"] = TensorSlice(0, ((start, end),))


def _tensor_parallel(model, experts, world: int, rank: int, slices: dict, expert_ranges: dict, attention: dict) -> None:
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
        _experts_inner(name, module, world, rank, slices, expert_ranges)
    for name, module in attentions:
        attention[name] = _attention_heads(name, module, num_heads, num_kv_heads, world, rank, slices)


def _experts_inner(name: str, experts: nn.Module, world: int, rank: int, slices: dict, expert_ranges: dict) -> None:
    """Columns [start, end) of each expert's inner dimension, in the module's own layout."""
    transposed, interleaved = experts.is_transposed, not experts.is_concatenated
    size = experts.down_proj.shape[-2] if transposed else experts.down_proj.shape[-1]
    if size < world:
        raise ValueError(f"expert inner size {size} is smaller than {world} ranks; use parallel='ep'")
    start, end = split_range(size, world, rank)
    expert_ranges[name] = (start, end)
    if not experts.has_gate:
        gate_up = ((start, end),)
    elif interleaved:  # gate0, up0, gate1, up1, ...
        gate_up = ((2 * start, 2 * end),)
    else:  # all gate rows, then all up rows
        gate_up = ((start, end), (size + start, size + end))
    gate_up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    gate_up_axis = 2 if transposed else 1  # the 2I (or I) axis of [E, H, 2I] or [E, 2I, H]
    slices[f"{name}.{gate_up_name}"] = TensorSlice(gate_up_axis, gate_up)
    slices[f"{name}.down_proj"] = TensorSlice(1 if transposed else 2, ((start, end),))
    if experts.has_bias:
        slices[f"{name}.{gate_up_name}_bias"] = TensorSlice(1, gate_up)
        if rank:  # added once, by rank 0: the all_reduce sums the ranks' partial outputs
            slices[f"{name}.down_proj_bias"] = TensorSlice(0, zeros=True)


def _attention_heads(name: str, module: nn.Module, num_heads: int, num_kv_heads: int, world: int, rank: int, slices: dict) -> AttentionShard:
    head_dim = getattr(module, "head_dim", None)
    widths = (module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features, module.o_proj.in_features)
    if head_dim is None or widths != (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim, num_heads * head_dim):
        # e.g. a q_proj that also emits a gate (Qwen3-Next): its rows aren't one block per head
        raise ValueError(f"tensor parallel can't split {type(module).__name__}: its projections aren't one block per head; use parallel='ep'")
    (q0, q1), (k0, k1) = tensor_parallel_heads(num_heads, num_kv_heads, world, rank)
    q_rows, kv_rows = ((q0 * head_dim, q1 * head_dim),), ((k0 * head_dim, k1 * head_dim),)
    for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        slices[f"{name}.{proj}.weight"] = TensorSlice(0, rows)
        if getattr(module, proj).bias is not None:
            slices[f"{name}.{proj}.bias"] = TensorSlice(0, rows)
    slices[f"{name}.o_proj.weight"] = TensorSlice(1, q_rows)
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
