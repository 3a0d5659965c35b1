"""Grouped-query attention for one-token decode without copying the KV cache per query head.

With a mask (always, over a static cache) Transformers' SDPA path up to 5.2x expands grouped KV
heads with `repeat_kv`: every decode step writes the whole cache out again once per query head
of a group, and attention reads those copies (qwen3-30b-a3b: 8 query heads a KV head, so 17
times the cache's bytes a step instead of one). Later versions fold the query heads instead
(`pack_gqa`); this module does the same for the versions that lack it, as an attention
implementation of Transformers' `AttentionInterface`, set per model: a one-token query's heads
of a group become that KV head's queries, and anything else goes to Transformers' own SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DECODE_GQA_SDPA = "hf_moe_accel_decode_gqa_sdpa"
# Transformers versions that fold grouped heads for one-token decode themselves.
TRANSFORMERS_FOLDS_GQA = hasattr(sdpa_attention, "pack_gqa")
# Extra inputs only Transformers' own implementation knows what to do with.
_DELEGATED_KWARGS = ("s_aux", "sinks", "position_bias", "softcap", "cache")


def decode_gqa_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, with one-token queries of grouped heads folded onto their KV head.

    query [B, Hq, 1, D], key/value [B, Hkv, K, D], mask [B, 1, 1, K] or None -> ([B, 1, Hq, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    foldable = (
        query.shape[2] == 1 and groups > 1 and dropout == 0.0 and not kwargs.get("output_attentions")
        and (attention_mask is None or attention_mask.shape[1] == 1)
        and not any(kwargs.get(name) is not None for name in _DELEGATED_KWARGS)
    )
    if not foldable:
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    # Head h = kv * groups + j (repeat_kv's order) becomes query j of KV head kv; the mask is shared.
    folded = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_GQA_SDPA, decode_gqa_sdpa)
AttentionMaskInterface.register(DECODE_GQA_SDPA, sdpa_mask)  # the masks SDPA takes


def _grouped(model: nn.Module) -> bool:
    config = model.config.get_text_config(decoder=True)
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return bool(heads and kv_heads and heads > kv_heads)


def apply_decode_gqa(model: nn.Module) -> bool:
    """Switch a grouped-query model from "sdpa" to the folded decode attention where Transformers
    lacks its own; True when switched (`remove_decode_gqa` switches back)."""
    if TRANSFORMERS_FOLDS_GQA or not hasattr(model, "set_attn_implementation"):
        return False
    if model.config._attn_implementation != "sdpa" or not _grouped(model):
        return False
    model.set_attn_implementation(DECODE_GQA_SDPA)
    return model.config._attn_implementation == DECODE_GQA_SDPA


def remove_decode_gqa(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and config._attn_implementation == DECODE_GQA_SDPA:
        model.set_attn_implementation("sdpa")
