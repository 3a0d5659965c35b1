"""One-token decode attention as a Transformers attention implementation, set per model.

`decode_gqa_sdpa` is registered in Transformers' `AttentionInterface` as DECODE_GQA_SDPA (with SDPA's
masks). For a one-token query (decode) with no dropout, no `output_attentions` and none of the
inputs only Transformers knows (`_DELEGATED_KWARGS`):
- where `DECODE_KERNEL` says (off for now), with a supported dtype and head dim
  (`decode_attention_supported`): our Triton kernel
  (`kernels/decode_attention.py`), one launch that reads each KV head once for all of its query
  heads (no `repeat_kv` copies). Under torch.compile it is an opaque custom op;
- otherwise, for grouped heads: SDPA with the query heads of a group folded onto their KV head.
  Transformers' SDPA path up to 5.2x expands grouped KV heads with `repeat_kv` (every decode step
  writes the whole cache out again once per query head of a group: 17 times the cache's bytes a
  step for qwen3-30b-a3b); later versions fold the heads themselves (`pack_gqa`), but not under
  torch.compile.
Anything else goes to Transformers' own SDPA.

`apply_decode_gqa` switches grouped models where Transformers lacks `pack_gqa`;
`apply_decode_attention` switches any "sdpa" model (grouped or not, for the kernel);
`remove_decode_gqa` switches either back to "sdpa". `DECODE_KERNEL` says where the kernel runs.
"""

from __future__ import annotations

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

DECODE_GQA_SDPA = "hf_moe_accel_decode_gqa_sdpa"
# Transformers versions that fold grouped heads for one-token decode themselves.
TRANSFORMERS_FOLDS_GQA = hasattr(sdpa_attention, "pack_gqa")
# Extra inputs only Transformers' own implementation knows what to do with.
_DELEGATED_KWARGS = ("s_aux", "sinks", "position_bias", "softcap", "cache")
# Where one-token queries go to the Triton kernel: "cuda" (CUDA tensors), "never", or "always" (CPU
# tensors too, through Triton's interpreter under TRITON_INTERPRET=1: tests). "never" until the kernel
# is measured inside a model's decode step on the GPU: only an earlier version of it was timed alone
# (docs/BENCHMARKS.md, fifth run), faster than SDPA for grouped heads at short caches, slower without groups.
DECODE_KERNEL = "never"


def _kernel_serves(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if DECODE_KERNEL == "never" or (DECODE_KERNEL == "cuda" and not query.is_cuda):
        return False
    devices = {t.device for t in (query, key, value, mask) if t is not None}
    return len(devices) == 1 and decode_attention_supported(query, key, value, mask)


def decode_gqa_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
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


def apply_decode_attention(model: nn.Module) -> bool:
    """Switch any "sdpa" model (grouped heads or not) to DECODE_GQA_SDPA, for the decode kernel; True
    when switched (`remove_decode_gqa` switches back)."""
    if not hasattr(model, "set_attn_implementation") or model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(DECODE_GQA_SDPA)
    return model.config._attn_implementation == DECODE_GQA_SDPA


def remove_decode_gqa(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and config._attn_implementation == DECODE_GQA_SDPA:
        model.set_attn_implementation("sdpa")
