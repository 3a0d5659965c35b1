"""The one state object an accelerated model carries, in one attribute: what each stage did to it.

Each stage owns its field and is the only code that reads it: `api` the patch report, `graphs` the
decode state, `offload` the engine, `parallel` the placement. This module sits below all of them
and imports none of them at run time; the field types name their classes for readers and type
checkers only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .graphs.generate import GraphDecodeState
    from .offload.engine import OffloadEngine
    from .parallel.place import PlacementState
    from .parallel.shards import ShardLayout
    from .patches.registry import PatchReport

_ATTR = "_hf_moe_accel"


@dataclass
class AcceleratedState:
    report: PatchReport | None = None  # set by accelerate() once the MoE blocks are patched
    decode: GraphDecodeState | None = None
    offload: OffloadEngine | None = None
    placement: PlacementState | None = None
    shard: ShardLayout | None = None  # set by parallel.load_for_rank: the model holds one rank's share, before and after accelerate()

    def is_empty(self) -> bool:
        return (self.report is None and self.decode is None and self.offload is None and self.placement is None
                and self.shard is None)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Pickled as None: a pickled accelerated model loads as a stock one (patches/swap.py), and its
        # stages' state (graphs, caches, threads) has no meaning in another process.
        return type(None), ()

    def __deepcopy__(self, memo: dict) -> AcceleratedState:
        copied = AcceleratedState()
        memo[id(self)] = copied  # before the fields: graph decode's runner leads back to the model, and to this
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied


def state_of(model: nn.Module) -> AcceleratedState | None:
    """The model's state, or None when no stage has touched it."""
    return model.__dict__.get(_ATTR)


def ensure_state(model: nn.Module) -> AcceleratedState:
    """The model's state, made empty on first use."""
    state = state_of(model)
    if state is None:
        state = model.__dict__[_ATTR] = AcceleratedState()
    return state


def drop_state_if_empty(model: nn.Module) -> None:
    """Remove the attribute once every stage has been undone: an unpatched model carries nothing of ours."""
    state = state_of(model)
    if state is not None and state.is_empty():
        del model.__dict__[_ATTR]
