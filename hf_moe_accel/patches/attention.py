"""One-token decode attention as a Transformers attention implementation, set per model.

`decode_attention_forward` is registered in Transformers' `AttentionInterface` as DECODE_ATTENTION (with SDPA's
masks). For a one-token query (decode) with no dropout, no `output_attentions` and none of the
inputs only Transformers knows (`_DELEGATED_KWARGS`):
- on CUDA tensors (`DECODE_KERNEL`), with a supported dtype and head dim (`decode_attention_supported`),
  where `kernel_is_faster` allows: our Triton kernel
  (`kernels/decode_attention.py`), one launch that reads each KV head once for all of its query
  heads (no `repeat_kv` copies) and skips masked keys. Under torch.compile it is an opaque custom op;
- otherwise, for grouped heads: SDPA with the query heads of a group folded onto their KV head.
  Transformers' SDPA path up to 5.17 expands grouped KV heads with `repeat_kv` (every decode step
  writes the whole cache out again once per query head of a group: 17 times the cache's bytes a
  step for qwen3-30b-a3b); later versions fold the heads themselves (`pack_gqa`), but not while
  torch.compile traces, which is how `compile_decode=True` captures its steps.
Anything else goes to Transformers' own SDPA.

`apply_decode_attention` switches an "sdpa" model to it, on every Transformers version, unless the
model's code tests the implementation's name against "sdpa" (`sdpa_name_test`);
`remove_decode_attention` switches it back to "sdpa". The configs then read DECODE_ATTENTION, which
is SDPA with the one-token paths above: a user's `set_attn_implementation("sdpa" | "eager" | ...)`
runs that implementation instead, as in stock (graph decode drops graphs captured under another).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels.decode_attention import (
    decode_attention,
    decode_attention_op,
    decode_attention_supported,
)
from .implementations import ImplementationName, model_configs, stock_name

logger = logging.getLogger("hf_moe_accel")

DECODE_ATTENTION = "hf_moe_accel_decode"
# Code comparing the attention implementation's name with "sdpa" (==, !=, in (...), "sdpa" in ...).
# Under our name such code takes its non-SDPA branch, which differs: DeepSeek-V3.2-style sparse
# attention hands its top-k key indices to the implementation instead of masking the other keys
# (SDPA, ours included, ignores them); Gemma-4 slices its KV-shared layers' queries where SDPA must not.
_SDPA_NAME_TEST = re.compile(
    r"""_attn_implementation\s*(?:[!=]=\s*["']sdpa["']|(?:not\s+)?in\s*[(\[{][^)\]}]*["']sdpa["'])"""
    r"""|["']sdpa["']\s*(?:[!=]=|(?:not\s+)?in)\s*[\w.]*_attn_implementation"""
)
# Extra inputs only Transformers' own implementation knows what to do with.
_DELEGATED_KWARGS = ("s_aux", "sinks", "position_bias", "softcap", "cache")
# Where one-token queries may go to the Triton kernel: "cuda" (CUDA tensors), "never", or "always"
# (CPU tensors too, through Triton's interpreter under TRITON_INTERPRET=1: tests).
DECODE_KERNEL = "cuda"
# Without grouped heads the kernel reads K and V as SDPA does: it takes at most this many keys over the
# batch (batch x cache length), SDPA the rest. With grouped heads the kernel takes every size. Re-derive with
# `python scripts/bench_decode_attention.py --heads 16:16:128,32:4:128 --batch 1,8,32 --keys 256,1024,4096`.
UNGROUPED_KERNEL_MAX_KEYS = 8192


def kernel_is_faster(batch: int, heads: int, kv_heads: int, keys: int) -> bool:
    """Whether the decode kernel is expected to beat SDPA at this size (see UNGROUPED_KERNEL_MAX_KEYS)."""
    return heads > kv_heads or batch * keys <= UNGROUPED_KERNEL_MAX_KEYS


def _kernel_serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if DECODE_KERNEL == "never" or (DECODE_KERNEL == "cuda" and not query.is_cuda):
        return False
    devices = {t.device for t in (query, key, value, mask) if t is not None}
    if len(devices) != 1 or not decode_attention_supported(query, key, value, mask):
        return False
    return kernel_is_faster(query.shape[0], query.shape[1], key.shape[1], key.shape[2])


def decode_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, with one-token queries on our kernel (CUDA) or, for grouped
    heads, folded onto their KV head.

    query [B, Hq, 1, D], key/value [B, Hkv, K, D], mask [B, 1, 1, K] or None -> ([B, 1, Hq, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    one_token = (
        query.shape[2] == 1 and dropout == 0.0 and not kwargs.get("output_attentions")
        and (attention_mask is None or attention_mask.shape[1] == 1)
        and not any(kwargs.get(name) is not None for name in _DELEGATED_KWARGS)
    )
    batch, heads, _, dim = query.shape
    if one_token and _kernel_serves(query, key, value, attention_mask):
        scale = dim**-0.5 if scaling is None else float(scaling)
        # The custom op keeps torch.compile out of the launch code; eager calls skip its dispatch cost.
        attend = decode_attention_op if torch.compiler.is_compiling() else decode_attention
        out = attend(query, key, value, attention_mask, scale)  # [B, Hq, 1, D] contiguous
        return out.view(batch, 1, heads, dim), None
    if not (one_token and groups > 1):
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)
    # Head h = kv * groups + j (repeat_kv's order) becomes query j of KV head kv; the mask is shared.
    folded = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # the masks SDPA takes


@functools.cache
def _tests_sdpa_name(module_name: str) -> bool:
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):  # no source to read: nothing known to branch on the name
        return False
    return _SDPA_NAME_TEST.search(source) is not None


def sdpa_name_test(model: nn.Module) -> str | None:
    """The module of `model`'s code (its modules' classes, with their bases) that tests the attention
    implementation's name against "sdpa", or None. Such a model must keep the name "sdpa"."""
    names = {cls.__module__ for module in model.modules() for cls in type(module).__mro__}
    ours = __name__.split(".")[0]
    return next((name for name in sorted(names)
                 if name.split(".")[0] not in ("builtins", "torch", ours) and _tests_sdpa_name(name)), None)


def apply_decode_attention(model: nn.Module) -> bool:
    """Switch an "sdpa" model (grouped heads or not) to DECODE_ATTENTION; True when switched
    (`remove_decode_attention` switches back)."""
    if not hasattr(model, "set_attn_implementation") or model.config._attn_implementation != "sdpa":
        return False
    if (tested_in := sdpa_name_test(model)) is not None:
        logger.info("hf_moe_accel: %s keeps SDPA attention: %s tests the attention implementation's name", type(model).__name__, tested_in)
        return False
    configs = model_configs(model)
    before = [stock_name(config._attn_implementation) for config in configs]
    model.set_attn_implementation(DECODE_ATTENTION)
    for config, name in zip(configs, before):
        if config._attn_implementation == DECODE_ATTENTION:  # pickled as the name it replaced (implementations.py)
            config._attn_implementation_internal = ImplementationName(DECODE_ATTENTION, name)
    return model.config._attn_implementation == DECODE_ATTENTION


def remove_decode_attention(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and config._attn_implementation == DECODE_ATTENTION:
        model.set_attn_implementation("sdpa")
