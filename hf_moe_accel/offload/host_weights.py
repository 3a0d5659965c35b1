"""Where the weights live while experts are offloaded, and back again.

`WeightPlacement` records where every parameter and buffer is, takes accelerate's dispatch hooks
off (a model loaded with an offloading `device_map`: their offloaded tensors are materialised on
the host from the hooks' weights maps, disk included), moves the expert tensors to pinned host
memory one tensor at a time (the host never holds two copies of the experts: each old tensor is
freed once its copy is in, and a hook's weights map is pointed at the copy), and every other
tensor to the GPU side. `restore` moves each tensor back and re-attaches the hooks as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import accelerate.hooks
import torch
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from accelerate.utils import (
    find_tied_parameters,
    named_module_tensors,
    retie_parameters,
    set_module_tensor_to_device,
)
from accelerate.utils.offload import PrefixedDataset
from torch import nn
from tqdm.auto import tqdm

# Attributes dispatch_model adds to the top module (wrappers warning against `model.to`); accelerate
# pops them when removing a hook, so they are put back with it.
_ADDED_ATTRIBUTES = tuple(getattr(accelerate.hooks, "_accelerate_added_attributes", ("to", "cuda")))


def get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    return module._parameters[name] if name in module._parameters else module._buffers[name]


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Point `module.name` at `value`, keeping the Parameter object (and so weight ties) alive."""
    if name in module._parameters:
        module._parameters[name].data = value
    else:
        module._buffers[name] = value


def _allocate_pinned(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


class PinnedArena:
    """Pinned host copies of tensors, carved out of large pinned chunks.

    torch's pinned allocator rounds every allocation up to a power of two, up to twice a tensor's
    bytes (an 805 MB expert tensor takes 1 GiB); chunks of a power-of-two size, filled first-fit,
    waste only their tails. A chunk lives as long as a tensor carved from it.
    """

    ALIGN = 512

    def __init__(self, chunk_bytes: int, allocate=_allocate_pinned) -> None:
        self.chunk_bytes = 1 << max(0, chunk_bytes - 1).bit_length()  # a power of two
        self.allocate = allocate
        self.chunks: list[list] = []  # [uint8 buffer, bytes used]

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        size = shape.numel() * dtype.itemsize
        padded = -(-size // self.ALIGN) * self.ALIGN
        chunk = next((c for c in self.chunks if c[1] + padded <= c[0].numel()), None)
        if chunk is None:
            chunk = [self.allocate(max(self.chunk_bytes, 1 << max(0, padded - 1).bit_length())), 0]
            self.chunks.append(chunk)
        out = chunk[0][chunk[1] : chunk[1] + size].view(dtype).view(shape)
        chunk[1] += padded
        return out

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tensor.shape, tensor.dtype).copy_(tensor)


@dataclass
class _DetachedHook:
    module: nn.Module
    hook: accelerate.hooks.ModelHook
    old_forward: object
    added_attributes: dict


def remove_hook_keeping_class_forward(module: nn.Module) -> None:
    """accelerate's `remove_hook_from_module` for one module, without the instance attribute it
    leaves: it sets `module.forward` to the forward captured when the hook was added, which would
    hide the class's forward (and so a class swap by `accelerate()`) from then on."""
    old_forward = getattr(module, "_old_forward", None)
    remove_hook_from_module(module)
    if old_forward is not None and module.__dict__.get("forward") is old_forward:
        del module.__dict__["forward"]


class DetachedHooks:
    """accelerate hooks taken off a model's modules, with their offloaded tensors materialised on the host."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[_DetachedHook] = []
        tied = find_tied_parameters(model)
        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None:
                continue
            entry = _DetachedHook(module, hook, getattr(module, "_old_forward", None),
                                  {a: module.__dict__[a] for a in _ADDED_ATTRIBUTES if a in module.__dict__})
            remove_hook_keeping_class_forward(module)
            self._materialise(module, hook)
            self.entries.append(entry)
        retie_parameters(model, tied)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if left:
            raise ValueError(
                f"{len(left)} tensors (e.g. {left[0]}) are on the meta device and no accelerate hook holds their values"
            )

    @staticmethod
    def _weights_maps(hook):
        return [h.weights_map for h in getattr(hook, "hooks", (hook,)) if getattr(h, "weights_map", None) is not None]

    def _materialise(self, module: nn.Module, hook) -> None:
        for weights_map in self._weights_maps(hook):
            for name, tensor in list(named_module_tensors(module, include_buffers=True, recurse=True)):
                if tensor.device.type != "meta":
                    continue
                try:
                    value = weights_map[name]
                except KeyError:
                    continue
                set_module_tensor_to_device(module, name, "cpu", value=value)

    def share(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Make the hook's weights map of `module` hold `tensor` for `name` (so the tensor it held is freed)."""
        for entry in self.entries:
            if entry.module is not module:
                continue
            for weights_map in self._weights_maps(entry.hook):
                if isinstance(weights_map, PrefixedDataset):
                    store, key = weights_map.dataset, weights_map.prefix + name
                else:
                    store, key = weights_map, name
                store = getattr(store, "state_dict", store)  # OffloadedWeightsLoader keeps host tensors in .state_dict
                if isinstance(store, dict) and key in store:
                    store[key] = tensor

    def reattach(self) -> None:
        for entry in self.entries:
            if entry.old_forward is not None:
                entry.module.forward = entry.old_forward
            add_hook_to_module(entry.module, entry.hook)  # offloading hooks put their tensors back on meta
            entry.module.__dict__.update(entry.added_attributes)


@dataclass
class _Home:
    module: nn.Module
    name: str
    device: torch.device


class WeightPlacement:
    """Expert tensors on the host (pinned when `pin`), all other tensors on `device`; `restore` undoes it."""

    @torch.no_grad()
    def __init__(
        self, model: nn.Module, expert_tensor_names: dict[nn.Module, list[str]], device: torch.device, pin: bool
    ) -> None:
        self.homes = [
            _Home(module, name, tensor.device)
            for module in model.modules()
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]
            if tensor is not None
        ]
        self.expert_keys = {(id(m), n) for m, names in expert_tensor_names.items() for n in names}
        self.hooks = DetachedHooks(model) if any(hasattr(m, "_hf_hook") for m in model.modules()) else None
        try:
            self._experts_to_host(expert_tensor_names, pin)
            self._move_each(lambda home: None if (id(home.module), home.name) in self.expert_keys else device)
        except BaseException:  # out of memory halfway: everything back as it was
            self.restore()
            raise

    def _experts_to_host(self, expert_tensor_names: dict[nn.Module, list[str]], pin: bool) -> None:
        sizes = [get_tensor(m, n).nbytes for m, names in expert_tensor_names.items() for n in names]
        arena = PinnedArena(min(max(4 * max(sizes, default=0), 2**28), 2**33)) if pin else None  # chunks: 256 MiB to 8 GiB
        progress = tqdm(expert_tensor_names.items(), desc="experts to pinned host memory" if pin else "experts to host",
                        unit="layer", disable=len(expert_tensor_names) < 8)
        for module, names in progress:
            for name in names:
                tensor = get_tensor(module, name)
                if tensor.device.type == "cpu" and (tensor.is_pinned() or not pin):
                    continue
                host = arena.copy(tensor) if pin else tensor.to("cpu")
                set_tensor(module, name, host)
                if self.hooks is not None:
                    self.hooks.share(module, name, host)

    def _move_each(self, target) -> None:
        moved = set()  # tied parameters: one Parameter object, moved once
        for home in self.homes:
            device = target(home)
            tensor = get_tensor(home.module, home.name)
            if device is None or id(tensor) in moved or tensor.device == torch.device(device):
                continue
            moved.add(id(tensor))
            set_tensor(home.module, home.name, tensor.to(device))

    @torch.no_grad()
    def restore(self) -> None:
        """Every tensor back on its device (tensors that an offloading hook held go back to it)."""
        self._move_each(lambda home: None if home.device.type == "meta" else home.device)
        if self.hooks is not None:
            self.hooks.reattach()
