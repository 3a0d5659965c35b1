"""One-token grouped-query attention folded onto the KV heads (no repeat_kv copies), against
Transformers' SDPA attention on the same inputs, and on the fixtures through generate()."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations import sdpa_attention

from hf_moe_accel import accelerate, patch_report, unpatch
from hf_moe_accel.patches.attention import DECODE_ATTENTION, decode_attention_forward

from .helpers import load_fixture


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("groups, query_len", [(4, 1), (1, 1), (4, 5)])
def test_folded_decode_attention_equals_transformers_sdpa(mask_kind, groups, query_len):
    g = torch.Generator().manual_seed(groups * 10 + query_len)
    batch, kv_heads, keys, dim = 3, 2, 13, 16
    query = torch.randn(batch, kv_heads * groups, query_len, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=g) for _ in range(2))
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(batch, 1, query_len, keys, generator=g) > 0.3
        allowed[..., 0] = True  # every query sees at least one key
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    module = _Attention(groups)
    ours, _ = decode_attention_forward(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (batch, query_len, kv_heads * groups, dim)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_folded_attention_is_set_per_grouped_model(fixture_path):
    """Set on every Transformers version (5.2x folds heads itself, but not under torch.compile);
    generate() gives the same tokens and logits as stock; unpatch puts "sdpa" back. Both fixtures
    have grouped heads."""
    model, tokenizer = load_fixture(fixture_path)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["def main(", "import os\nimport sys\n\nclass Config:\n    "], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", return_dict_in_generate=True,
                  output_logits=True)
    stock = model.generate(**inputs, **kwargs)
    accelerate(model, cuda_graphs=False)
    assert patch_report(model).decode_attention
    assert model.config._attn_implementation == DECODE_ATTENTION
    ours = model.generate(**inputs, **kwargs)
    unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
