"""Deferred stop checks inside the generate() calls our CUDA graphs serve.

generate()'s loop reads `unfinished_sequences.max() == 0` on the host after every step, so the host
waits for each step to finish before it prepares the next, and the GPU idles meanwhile (how long:
the step against the bare replay in `python scripts/profile_decode_step.py`).
Transformers (from 5.18) has the remedy, `DeferredStopCheck`: the flag is copied asynchronously and
read one step late, the one extra step is undone at the end (tokens, scores), and a streamer gets
each token one step later. It turns it on for MPS only. Inside the calls we serve, we turn it on for
CUDA too, where the cache is not handed back to the caller (so nothing but the returned outputs needs
undoing; a returned cache keeps the per-step check). Before 5.18 this is a no-op.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from transformers.generation import utils as generation_utils

_DEFERRED_STOP_CHECK = getattr(generation_utils, "DeferredStopCheck", None)
_PATCHED_ATTR = "_hf_moe_accel_wrapped"
_local = threading.local()  # each thread's own calls: generate() calls in other threads are theirs
_WRAP_LOCK = threading.Lock()  # two models' first calls in two threads must not wrap it twice


def stop_checks_can_be_deferred() -> bool:
    """Whether this transformers release has deferred stop checks (5.18 and later)."""
    return _DEFERRED_STOP_CHECK is not None


@contextmanager
def deferred_stop_checks(on_deferred: Callable[[], None]) -> Iterator[None]:
    """Within: generate() calls on CUDA in this thread defer their stop checks where transformers'
    own rule allows it on MPS and the cache isn't returned; `on_deferred()` runs for each such call."""
    _wrap_is_supported()
    with _on_deferred_in_thread(on_deferred):
        yield


@contextmanager
def stock_stop_checks() -> Iterator[None]:
    """Within: generate() calls in this thread get transformers' own answer, as outside our calls (a call
    made from inside a served one is not served); the served call's switch is back after."""
    with _on_deferred_in_thread(None):
        yield


@contextmanager
def _on_deferred_in_thread(on_deferred: Callable[[], None] | None) -> Iterator[None]:
    previous = getattr(_local, "on_deferred", None)
    _local.on_deferred = on_deferred
    try:
        yield
    finally:
        _local.on_deferred = previous


def _wrap_is_supported() -> None:
    """Wrap `DeferredStopCheck.is_supported` once per process; outside our calls it answers as before."""
    if _DEFERRED_STOP_CHECK is None:
        return
    with _WRAP_LOCK:
        if not getattr(_DEFERRED_STOP_CHECK.is_supported, _PATCHED_ATTR, False):
            _DEFERRED_STOP_CHECK.is_supported = staticmethod(_wrapped(_DEFERRED_STOP_CHECK.is_supported))


def _wrapped(original: Callable[..., bool]) -> Callable[..., bool]:
    """`is_supported` answering True for the calls `deferred_stop_checks` covers in this thread, else `original`'s answer."""
    signature = inspect.signature(original)

    def is_supported(*args, **kwargs) -> bool:
        on_deferred = getattr(_local, "on_deferred", None)
        if on_deferred is not None:
            arguments = signature.bind(*args, **kwargs).arguments
            device = arguments.get("device")
            if (getattr(device, "type", None) == "cuda" and not arguments.get("is_assistant", False)
                    and arguments.get("cache_is_returned") is False):
                on_deferred()
                return True
        return original(*args, **kwargs)

    setattr(is_supported, _PATCHED_ATTR, True)
    return is_supported
