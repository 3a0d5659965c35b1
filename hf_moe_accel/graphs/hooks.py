"""The contract between graph decode and whatever places the weights (offload/, parallel/).

A placement that does host work in or between decode steps says so here; `api.accelerate` hands the
object it returns to `enable_graph_decode`. A model placed with no such work passes `NO_HOOKS`.
The hooks speak for decode steps: a placement that gives any of blocked_reason, step_blocker,
before_replay or rehearsal has host work in its forwards, so its prefill runs eagerly (`prefill.py`;
expert offload fills its slots during a prefill).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeHooks:
    # Every decode step runs eagerly, for this reason (host work in every MoE layer).
    blocked_reason: str | None = None
    # (batch size, static cache positions) -> why steps of that shape can't replay a graph, or None.
    # A placement whose steps are free of host work for some shapes only gives one. Its presence also
    # says the placement's kernels read weights on other devices in place, so a device map spread over
    # devices doesn't by itself block graphs.
    step_blocker: Callable[[int, int], str | None] | None = None
    # Host work between decode steps (e.g. refilling expert slots): called before each replay.
    before_replay: Callable[[], None] | None = None
    # Entered around each run of a step that its replay then repeats (a capture's warm-up, the capture),
    # so that per-step bookkeeping counts the step once, as eager decoding does.
    rehearsal: Callable[[], AbstractContextManager[None]] | None = None
    # Static caches the pool may keep at once (None: the pool's default); a memory budget that keeps KV
    # room for one generation says 1.
    max_pooled_caches: int | None = None


NO_HOOKS = DecodeHooks()
