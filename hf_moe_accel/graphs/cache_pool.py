"""Static KV caches kept across generate() calls, so captured decode graphs stay valid.

Transformers makes a new `StaticCache` in every static-cache `generate()` call; a graph captured
over one cache's tensors can't serve the next. The pool keeps Transformers' own `StaticCache`
objects, one per (batch size, length bucket), resets one (in place) for each call that fits it,
and evicts the least recently used beyond `max_entries`, so memory stays bounded however batch
sizes and lengths change. Every cache that leaves the pool (evicted, released, or dropped because
resetting it failed) goes through `on_evict`, so no graph outlives the pool's hold on its cache.
The pool is not locked: one generate() call at a time uses it (graph decode's per-model lock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from transformers import PretrainedConfig, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..costmodel.memory import MIN_BUCKET, length_bucket


def graph_static_cache(config: PretrainedConfig, max_cache_len: int) -> StaticCache:
    """Transformers' `StaticCache` for `config`, its sliding-window layers swapped for full-length ones.

    A sliding-window layer keeps its write position in a Python int, which a replayed graph never
    advances. A full-length `StaticLayer` keeps it in a device tensor; the model's sliding-window
    mask (built from absolute positions over the whole cache) still limits attention to the window,
    at the cost of `max_cache_len` positions of memory instead of the window's.
    """
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) if isinstance(layer, StaticSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def static_cache_blocker(config: PretrainedConfig) -> str | None:
    """Why this model's static cache can't be replayed by a graph, or None when it can.

    Only full-attention `StaticLayer`s keep their write position in a device tensor (sliding-window
    layers are swapped for them, `graph_static_cache`); linear-attention layers and other kinds
    track theirs in Python, which a replayed graph never updates.
    """
    try:
        cache = graph_static_cache(config, MIN_BUCKET)
    except Exception as error:  # configs Transformers can't build a static cache for
        return f"Transformers can't build a static cache for it ({type(error).__name__}: {error})"
    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds:
        return f"its static cache has {', '.join(kinds)} layers, whose position a replayed graph can't advance"
    return None


class StaticCachePool:
    def __init__(self, config: PretrainedConfig, max_entries: int = 3, on_evict: Callable[[StaticCache], None] | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.config = config
        self.max_entries = max_entries
        self.on_evict = on_evict
        self._caches: OrderedDict[tuple[int, int], StaticCache] = OrderedDict()
        # (batch size, length bucket) of the cache `get` handed out last: what a caller decoding the same
        # call eagerly sizes its own cache to (scripts/soak_generate.py).
        self.last_key: tuple[int, int] | None = None

    def get(self, batch_size: int, max_cache_len: int) -> StaticCache:
        """A reset static cache holding `batch_size` sequences of up to `max_cache_len` tokens."""
        key = (batch_size, length_bucket(max_cache_len))
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = graph_static_cache(self.config, key[1])
        else:
            try:
                cache.reset()  # zeroes keys, values and positions in place: tensors (and graphs over them) stay valid
            except BaseException:
                self._evict(cache)  # out of the pool: its graphs must go with it
                raise
        self._caches[key] = cache
        self.last_key = key
        while len(self._caches) > self.max_entries:
            _, evicted = self._caches.popitem(last=False)
            self._evict(evicted)
        return cache

    def owns(self, cache: object) -> bool:
        return any(cache is c for c in self._caches.values())

    def release(self, cache: StaticCache) -> None:
        """Hand `cache` over to the caller (it was returned to the user): the pool forgets it."""
        for key, c in list(self._caches.items()):
            if c is cache:
                del self._caches[key]
                self._evict(cache)

    def clear(self) -> None:
        while self._caches:
            _, cache = self._caches.popitem()
            self._evict(cache)

    def __len__(self) -> int:
        return len(self._caches)

    def kv_cache_bytes(self) -> int:
        """Bytes of the pooled caches' key and value tensors (allocated at their first prefill)."""
        # A snapshot of the caches first: graph_stats() may run while another thread's call takes or evicts one.
        return sum(
            t.numel() * t.element_size()
            for cache in tuple(self._caches.values())
            for layer in cache.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )

    def _evict(self, cache: StaticCache) -> None:
        if self.on_evict is not None:
            self.on_evict(cache)
