"""Expert, tensor and data parallel over torch.distributed: shard a loaded, patched model in place.

Every rank (a process started by torchrun) loads the same model, then keeps its share, or loads
only its share (`loading.load_for_rank`); `shards.py` decides the share, the same either way:

- expert parallel: each MoE layer's experts split in contiguous ranges over the ranks (uneven
  counts are fine); a rank's fused experts see the routed ids of its range, the others set to -1
  ("no expert", the fused-experts contract), and the partial outputs are summed by all_reduce.
  Attention, routers, shared experts and embeddings are replicated.
- tensor parallel: attention heads and each expert's inner dimension split over the ranks; the
  attention output projection and the experts each end in an all_reduce. KV heads split too, or
  are replicated when there are fewer KV heads than ranks.
- data parallel: each rank holds a full replica and decodes its own requests.

Every exchange between ranks is a torch.distributed collective (NCCL between GPUs, on one node or
several; gloo on the CPU). A collective that fails (a rank exited, or didn't answer within the
process group's timeout) raises `CollectiveError` on the ranks still running.

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

from ..kernels.spec import is_experts_module
from .shards import (
    AttentionShard,
    ShardLayout,
    check_loaded_shard,
    loaded_shard,
    shard_layout,
)
from .shards import split_range as split_range
from .shards import tensor_parallel_heads as tensor_parallel_heads

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


def rank_device() -> torch.device:
    """This process's device under torchrun: the GPU of its local rank, or the CPU without CUDA."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


class CollectiveError(RuntimeError):
    """A collective with the other ranks failed: a rank exited, or didn't answer within the process
    group's timeout."""


def collective_failed(what: str, error: BaseException) -> CollectiveError:
    rank = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    return CollectiveError(
        f"{rank}: {what} with the other ranks failed: a rank exited, or didn't answer within the process "
        f"group's timeout (the launcher's log names the rank that failed first). {type(error).__name__}: {error}"
    )


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> None:
    """`dist.all_reduce`, raising CollectiveError when the other ranks can't be reached."""
    try:
        dist.all_reduce(tensor, op=op, group=group)
    except RuntimeError as error:
        raise collective_failed("all_reduce", error) from error


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
        all_reduce(output, group=group)
        return output

    return hook


def _refuse_training(module: nn.Module, args, kwargs) -> None:
    if module.training:
        raise RuntimeError("a parallel placement serves inference only: call model.eval() (the sharded layers have no backward)")


def _fingerprint(tensor: torch.Tensor, samples: int = 1 << 16) -> torch.Tensor:
    """A float64 sum over an evenly strided sample of `tensor`: a small copy, never a whole one in
    float64 (an embedding or a layer's experts can be gigabytes)."""
    flat = tensor.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // samples)].double().sum().cpu()


def check_same_weights(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise when the ranks hold different weights (e.g. random-initialised without a common seed).

    `device` is this rank's device (where an NCCL collective must run). A model loaded as one rank's
    share is compared on the tensors every rank holds whole."""
    embedding = model.get_input_embeddings().weight
    loaded = loaded_shard(model)
    if loaded is None:
        probes = [embedding, *(m.down_proj for m in model.modules() if is_experts_module(m))][:4]
    else:
        whole = (p for name, p in model.named_parameters() if name not in loaded.slices and p is not embedding)
        probes = [embedding, *whole][:4]
    fingerprint = torch.stack([_fingerprint(p) for p in probes])
    backend_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    low, high = fingerprint.to(backend_device), fingerprint.clone().to(backend_device)
    all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError("the ranks hold different weights: every process must load the same checkpoint (or seed alike)")


# ---- expert and tensor parallel --------------------------------------------------------------


def _rank_layout(model: nn.Module, kind: str, group: dist.ProcessGroup | None) -> tuple[ShardLayout, bool]:
    """(this rank's layout, whether the model already holds just that share: `load_for_rank`)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    loaded = loaded_shard(model)
    if loaded is not None:
        check_loaded_shard(model, loaded, kind, rank, world)
        return loaded, True
    return shard_layout(model, kind, rank, world), False


def _take_shares(model: nn.Module, layout: ShardLayout, device: torch.device, undo: UndoLog) -> None:
    """Replace each parameter the layout splits by this rank's part of it, on `device`."""
    for name, part in layout.slices.items():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        _replace_parameter(module, param_name, part.take(module._parameters[param_name].detach()).to(device), undo)


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
    """Keep this rank's range of every MoE layer's experts on `device`, the rest of the model whole.

    A model loaded as this rank's share (`load_for_rank`) keeps its tensors; only the hooks go on."""
    layout, loaded = _rank_layout(model, "ep", group)
    with _moving_to(model, device) as undo:
        if not loaded:
            _take_shares(model, layout, device, undo)
        for name, (start, end) in layout.expert_ranges.items():
            experts = model.get_submodule(name)
            _add_hook(experts.register_forward_pre_hook(_local_ids_hook(start, end), with_kwargs=True), undo)
            _add_hook(experts.register_forward_hook(_all_reduce_output(group)), undo)
    return undo


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
        all_reduce(square_sum, group=self.group)
        x = x * torch.rsqrt(square_sum / self.full_width + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def _shard_attention(attention: nn.Module, shard: AttentionShard, group, undo: UndoLog) -> None:
    """Sharded q/k norms, local head counts and the output all-reduce on an attention module whose
    projections already hold this rank's heads."""
    for name, full in shard.split_norms:
        norm = getattr(attention, name)
        attention._modules[name] = ShardedRMSNorm(norm.weight.detach(), norm.variance_epsilon, full, group)
        undo.push(lambda name=name, norm=norm: attention._modules.__setitem__(name, norm))
    (q0, q1), (k0, k1) = shard.heads, shard.kv_heads
    local = {"num_key_value_groups": (q1 - q0) // (k1 - k0), "num_heads": q1 - q0, "num_attention_heads": q1 - q0,
             "num_key_value_heads": k1 - k0}
    for name, value in local.items():
        if isinstance(attention.__dict__.get(name), int):
            _set_attribute(attention, name, value, undo)
    _add_hook(attention.o_proj.register_forward_hook(_all_reduce_output(group)), undo)


def shard_tensor_parallel(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> UndoLog:
    """Split attention heads and every expert's inner dimension over the ranks; the rest replicated.

    A model loaded as this rank's share (`load_for_rank`) keeps its tensors; only the hooks, the
    sharded norms and the local head counts go on."""
    layout, loaded = _rank_layout(model, "tp", group)
    with _moving_to(model, device) as undo:
        if not loaded:
            _take_shares(model, layout, device, undo)
        for name, shard in layout.attention.items():
            _shard_attention(model.get_submodule(name), shard, group, undo)
        for name in layout.expert_ranges:
            experts = model.get_submodule(name)
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
