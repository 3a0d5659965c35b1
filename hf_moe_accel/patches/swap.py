"""Swap a module instance's class for a subclass with an accelerated forward, and back.

A class swap keeps the instance: its parameters and buffers (never copied), its hooks
(Transformers' output recorders are forward hooks on router instances) and `isinstance` checks
against the original class all stay valid. `restore` puts the original class back.

Copies and pickles. `copy.copy` and `copy.deepcopy` of a swapped module keep the swap (an
accelerated copy). Pickling (`torch.save(model)`, `pickle`, multiprocessing) writes the original
class without the swap's attributes: the subclass keeps the original's name and module, so a pickle
naming it could not be loaded, and a pickle must load where this package isn't imported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

STATE_ATTR = "_hf_moe_accel_state"
_ORIGINAL_CLASS_ATTR = "_hf_moe_accel_original_class"
_SWAP_ATTRS = (STATE_ATTR, _ORIGINAL_CLASS_ATTR)
_SUBCLASS_CACHE: dict[tuple, type] = {}


def _reduce_as_original(self: nn.Module, protocol: int) -> tuple:
    """Pickle as the original class, without the swap's attributes (unpickled: a stock module)."""
    state = {k: v for k, v in self.__getstate__().items() if k not in _SWAP_ATTRS}
    # object.__new__, not copyreg.__newobj__: pickle refuses __newobj__ of a class other than the object's.
    return object.__new__, (self.__dict__[_ORIGINAL_CLASS_ATTR],), state


def _copy_swapped(self: nn.Module) -> nn.Module:
    copied = type(self).__new__(type(self))
    copied.__setstate__(self.__getstate__())
    return copied


def _deepcopy_swapped(self: nn.Module, memo: dict) -> nn.Module:
    copied = type(self).__new__(type(self))
    memo[id(self)] = copied  # before the state: the state may lead back to this module
    copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return copied


# Every swapped subclass has these beside its own methods (see the module docstring).
_COPY_AND_PICKLE = {"__reduce_ex__": _reduce_as_original, "__copy__": _copy_swapped, "__deepcopy__": _deepcopy_swapped}


def swap_methods(module: nn.Module, methods: Mapping[str, Callable[..., Any]], state: Any = None) -> None:
    """Give `module` a subclass overriding `methods`, keeping `state` (if given) on it for `swapped_state`.

    The subclass keeps the original class name: `save_pretrained` writes it to the config as the
    architecture, which must stay loadable.
    """
    original = type(module)
    key = (original, tuple(sorted(methods.items())))
    if key not in _SUBCLASS_CACHE:
        namespace = {**_COPY_AND_PICKLE, **methods, "__qualname__": original.__qualname__, "__module__": original.__module__}
        _SUBCLASS_CACHE[key] = type(original.__name__, (original,), namespace)
    object.__setattr__(module, _ORIGINAL_CLASS_ATTR, original)
    if state is not None:
        object.__setattr__(module, STATE_ATTR, state)
    module.__class__ = _SUBCLASS_CACHE[key]


def swap_forward(module: nn.Module, forward: Callable[..., Any], state: Any) -> None:
    """Make `module` run `forward(module, *args)`, keeping `state` on it for `swapped_state`."""
    swap_methods(module, {"forward": forward}, state)


def swapped_state(module: nn.Module) -> Any:
    """The state a swap keeps on `module` (the swapped methods read it as `getattr(self, STATE_ATTR)`), or None."""
    return module.__dict__.get(STATE_ATTR)


def is_swapped(module: nn.Module) -> bool:
    return _ORIGINAL_CLASS_ATTR in module.__dict__


def restore(module: nn.Module) -> None:
    """Undo `swap_forward`: the original class back, the state removed."""
    module.__class__ = module.__dict__.pop(_ORIGINAL_CLASS_ATTR)
    module.__dict__.pop(STATE_ATTR, None)
