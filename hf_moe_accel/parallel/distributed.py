"""Expert, tensor and data parallel over torch.distributed: shard a loaded, patched model in place.

Every rank (a process started by torchrun) loads the same model, then keeps its share:

- expert parallel: each MoE layer's experts split in contiguous ranges over the ranks (uneven
  counts are fine); a rank's fused experts see the routed ids of its range, the others set to -1
  ("no expert", the fused-experts contract), and the partial outputs are summed by all_reduce.
  Attention, routers, shared experts and embeddings are replicated.
- tensor parallel: attention heads and each expert's inner dimension split over the ranks; the
  attention output projection and the experts each end in an all_reduce. KV heads split too, or
  are replicated when there are fewer KV heads than ranks.
- data parallel: each rank holds a full replica and decodes its own requests.

Transformers' own tensor/expert parallel (`tp_plan`, `DistributedConfig`) is not used: it shards at
`from_pretrained` into DTensors and (5.23) installs its forwards as instance attributes, which
bypass the fused experts; its API also changed within 5.17-5.23. This module works on a model
already loaded, with plain tensors, through forward hooks the undo log removes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..costmodel.shapes import is_qkvo_attention
from ..kernels.spec import is_experts_module

logger = logging.getLogger("hf_moe_accel")


@dataclass
class UndoLog:
    """Actions that put the model back, run last-in first-out."""

    actions: list[Callable[[], None]] = field(default_factory=list)

    def push(self, action: Callable[[], None]) -> None:
        self.actions.append(action)

    def undo(self) -> None:
        while self.actions:
            self.actions.pop()()


def distributed_world() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed runs with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` of `size` items in `parts` contiguous parts, the first ones larger."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@contextmanager
def _moving_to(model: nn.Module, device: torch.device) -> Iterator[UndoLog]:
    """An undo log for the changes made in the block, whose last step moves `model` back to its
    device; the model goes to `device` after the block, and an error undoes all done so far."""
    home = single_device(model)
    undo = UndoLog()
    undo.push(lambda: model.to(home))
    try:
        yield undo
        model.to(device)
    except BaseException:
        undo.undo()
        raise


def single_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        found = ", ".join(sorted(map(str, devices)))
        raise ValueError(
            f"placement starts from a model held on one device (load it on the CPU and let accelerate() place it); "
            f"this one is on {found}"
        )
    return next(iter(devices))


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor, undo: UndoLog) -> None:
    original = module._parameters[name]
    module._parameters[name] = nn.Parameter(value, requires_grad=False)
    undo.push(lambda: module._parameters.__setitem__(name, original))


def _set_attribute(module: nn.Module, name: str, value: object, undo: UndoLog) -> None:
    original = module.__dict__[name]
    module.__dict__[name] = value
    undo.push(lambda: module.__dict__.__setitem__(name, original))


def _add_hook(handle, undo: UndoLog) -> None:
    undo.push(handle.remove)


def _all_reduce_output(group: dist.ProcessGroup | None):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    return hook


def _refuse_training(module: nn.Module, args, kwargs) -> None:
    if module.training:
        raise RuntimeError("a parallel placement serves inference only: call model.eval() (the sharded layers have no backward)")


def check_same_weights(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise when the ranks hold different weights (e.g. random-initialised without a common seed).

    `device` is this rank's device (where an NCCL collective must run)."""
    probes = [model.get_input_embeddings().weight, *(m.down_proj for m in model.modules() if is_experts_module(m))][:4]
    fingerprint = torch.stack([p.detach().double().sum().cpu() for p in probes])
    backend_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    low, high = fingerprint.to(backend_device), fingerprint.clone().to(backend_device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError("the ranks hold different weights: every process must load the same checkpoint (or seed alike)")


# ---- expert parallel -------------------------------------------------------------------------


def _experts_slice(experts: nn.Module, start: int, end: int, device: torch.device, undo: UndoLog) -> None:
    for name, param in list(experts.named_parameters(recurse=False)):
        _replace_parameter(experts, name, param.detach()[start:end].to(device), undo)


def _local_ids_hook(start: int, end: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        _refuse_training(module, args, kwargs)
        if len(args) >= 2:
            ids = args[1]
        elif "top_k_index" in kwargs:
            ids = kwargs["top_k_index"]
        else:
            raise TypeError(f"{type(module).__name__} was called without its routed expert ids (top_k_index)")
        local = ids - start
        local = local.masked_fill((local < 0) | (local >= end - start), -1)  # another rank's expert
        if len(args) >= 2:
            return (args[0], local, *args[2:]), kwargs
        return args, {**kwargs, "top_k_index": local}

    return hook


def shard_expert_parallel(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> UndoLog:
    """Keep this rank's range of every MoE layer's experts on `device`, the rest of the model whole."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    experts_modules = [m for m in model.modules() if is_experts_module(m)]
    num_experts = {(m.gate_up_proj if m.has_gate else m.up_proj).shape[0] for m in experts_modules}
    if min(num_experts) < world:
        raise ValueError(f"expert parallel over {world} ranks needs at least {world} experts per layer; this model has {min(num_experts)}")
    with _moving_to(model, device) as undo:
        for experts in experts_modules:
            total = (experts.gate_up_proj if experts.has_gate else experts.up_proj).shape[0]
            start, end = split_range(total, world, rank)
            _experts_slice(experts, start, end, device, undo)
            _add_hook(experts.register_forward_pre_hook(_local_ids_hook(start, end), with_kwargs=True), undo)
            _add_hook(experts.register_forward_hook(_all_reduce_output(group)), undo)
    return undo


# ---- tensor parallel -------------------------------------------------------------------------


def _inner_slice(experts: nn.Module, start: int, end: int, size: int, rank: int, device: torch.device, undo: UndoLog) -> None:
    """Columns [start, end) of each expert's inner dimension (of `size`), in the module's own layout."""
    transposed, interleaved = experts.is_transposed, not experts.is_concatenated
    inner_axis = -1 if transposed else -2  # the 2I (or I) axis of gate_up

    def gate_up_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
        if not experts.has_gate:
            return t.narrow(axis, start, end - start)
        if interleaved:  # gate0, up0, gate1, up1, ...
            return t.narrow(axis, 2 * start, 2 * (end - start))
        return torch.cat([t.narrow(axis, start, end - start), t.narrow(axis, size + start, end - start)], dim=axis)

    gate_up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    _replace_parameter(experts, gate_up_name, gate_up_rows(getattr(experts, gate_up_name).detach(), inner_axis).to(device), undo)
    down = experts.down_proj.detach()
    down_axis = -2 if transposed else -1
    _replace_parameter(experts, "down_proj", down.narrow(down_axis, start, end - start).to(device), undo)
    if experts.has_bias:
        bias_name = f"{gate_up_name}_bias"
        _replace_parameter(experts, bias_name, gate_up_rows(getattr(experts, bias_name).detach(), -1).to(device), undo)
        # The down bias is added once, on rank 0: the all_reduce sums the ranks' partial outputs.
        down_bias = experts.down_proj_bias.detach()
        _replace_parameter(experts, "down_proj_bias", (down_bias if rank == 0 else torch.zeros_like(down_bias)).to(device), undo)


class ShardedRMSNorm(nn.Module):
    """An RMSNorm over a width split across ranks (OLMoE's q/k norms span all heads): the mean of
    squares is all-reduced, then `weight * (x * rsqrt(mean + eps)).to(input dtype)` as the T5 norm."""

    def __init__(self, weight: torch.Tensor, eps: float, full_width: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps
        self.full_width = full_width
        self.group = group

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        square_sum = x.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(square_sum, group=self.group)
        x = x * torch.rsqrt(square_sum / self.full_width + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def _t5_rms_norm_matches(norm: nn.Module) -> bool:
    """Whether `norm` computes ShardedRMSNorm's formula (checked on a random input, on the CPU)."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if eps is None or weight is None or weight.dim() != 1:
        return False
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return torch.allclose(norm(x), expected, rtol=1e-3, atol=1e-3)


def _shard_norm(attention: nn.Module, name: str, start: int, end: int, full: int, device, group, undo: UndoLog) -> None:
    norm = getattr(attention, name, None)
    if norm is None or getattr(norm, "weight", None) is None or norm.weight.numel() != full:
        return  # absent, or per head (replicated as is)
    if not _t5_rms_norm_matches(norm):
        raise ValueError(
            f"tensor parallel can't split {type(attention).__name__}.{name} ({type(norm).__name__}), a norm over all "
            "heads of a kind it doesn't know; use parallel='ep'"
        )
    sharded = ShardedRMSNorm(norm.weight.detach()[start:end].to(device), norm.variance_epsilon, full, group)
    attention._modules[name] = sharded
    undo.push(lambda: attention._modules.__setitem__(name, norm))


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


def _shard_attention(attention: nn.Module, config, rank: int, world: int, device, group, undo: UndoLog) -> None:
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(attention, "head_dim", None)
    widths = (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features, attention.o_proj.in_features)
    if head_dim is None or widths != (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim, num_heads * head_dim):
        # e.g. a q_proj that also emits a gate (Qwen3-Next): its rows aren't one block per head
        raise ValueError(f"tensor parallel can't split {type(attention).__name__}: its projections aren't one block per head; use parallel='ep'")
    (q0, q1), (k0, k1) = tensor_parallel_heads(num_heads, num_kv_heads, world, rank)
    rows = {"q_proj": (q0 * head_dim, q1 * head_dim), "k_proj": (k0 * head_dim, k1 * head_dim), "v_proj": (k0 * head_dim, k1 * head_dim)}
    for name, (start, end) in rows.items():
        linear = getattr(attention, name)
        _replace_parameter(linear, "weight", linear.weight.detach()[start:end].to(device), undo)
        if linear.bias is not None:
            _replace_parameter(linear, "bias", linear.bias.detach()[start:end].to(device), undo)
    _shard_norm(attention, "q_norm", q0 * head_dim, q1 * head_dim, num_heads * head_dim, device, group, undo)
    _shard_norm(attention, "k_norm", k0 * head_dim, k1 * head_dim, num_kv_heads * head_dim, device, group, undo)
    o_proj = attention.o_proj
    _replace_parameter(o_proj, "weight", o_proj.weight.detach()[:, q0 * head_dim : q1 * head_dim].to(device), undo)
    if o_proj.bias is not None:  # added once: the all_reduce sums the ranks' partial outputs
        bias = o_proj.bias.detach()
        _replace_parameter(o_proj, "bias", (bias if rank == 0 else torch.zeros_like(bias)).to(device), undo)
    sinks = attention._parameters.get("sinks")
    if sinks is not None:  # GPT-OSS: one learned sink logit per head
        _replace_parameter(attention, "sinks", sinks.detach()[q0:q1].to(device), undo)
    local = {"num_key_value_groups": (q1 - q0) // (k1 - k0), "num_heads": q1 - q0, "num_attention_heads": q1 - q0,
             "num_key_value_heads": k1 - k0}
    for name, value in local.items():
        if isinstance(attention.__dict__.get(name), int):
            _set_attribute(attention, name, value, undo)
    _add_hook(o_proj.register_forward_hook(_all_reduce_output(group)), undo)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(n in type(m).__name__ for n in ("Attention", "Attn")) and hasattr(m, "o_proj")]


def shard_tensor_parallel(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> UndoLog:
    """Split attention heads and every expert's inner dimension over the ranks; the rest replicated."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config = model.config.get_text_config()
    attentions = _attention_modules(model)
    unsupported = sorted({type(a).__name__ for a in attentions if not is_qkvo_attention(a)})
    if unsupported or not attentions:
        what = ", ".join(unsupported) or "no attention module found"
        raise ValueError(f"tensor parallel shards q/k/v/o attention; {what} has another layout: use parallel='ep'")
    tensor_parallel_heads(config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads, world, rank)
    experts_modules = [m for m in model.modules() if is_experts_module(m)]
    with _moving_to(model, device) as undo:
        for attention in attentions:
            _shard_attention(attention, config, rank, world, device, group, undo)
        for experts in experts_modules:
            size = experts.down_proj.shape[-2] if experts.is_transposed else experts.down_proj.shape[-1]
            if size < world:
                raise ValueError(f"expert inner size {size} is smaller than {world} ranks; use parallel='ep'")
            start, end = split_range(size, world, rank)
            _inner_slice(experts, start, end, size, rank, device, undo)
            _add_hook(experts.register_forward_pre_hook(_refuse_training, with_kwargs=True), undo)
            _add_hook(experts.register_forward_hook(_all_reduce_output(group)), undo)
    return undo


def replicate(model: nn.Module, device: torch.device) -> UndoLog:
    """Data parallel: this rank holds the whole model on `device` (in one process: the single-GPU plan)."""
    home = single_device(model)
    undo = UndoLog()
    undo.push(lambda: model.to(home))
    model.to(device)
    return undo
