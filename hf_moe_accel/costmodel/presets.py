"""Model shapes of real MoE checkpoints (public dimensions), built with random weights: no download.

The shapes are those of the benchmark method (docs/BENCHMARKS.md). `tiny-qwen3-moe` is the CPU default: a real family
at a size a 2-core machine runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


def _olmoe() -> PretrainedConfig:
    return AutoConfig.for_model(
        "olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304, norm_topk_prob=False,
    )


def _qwen3_30b() -> PretrainedConfig:
    return AutoConfig.for_model(
        "qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    )


def _mixtral() -> PretrainedConfig:
    return AutoConfig.for_model(
        "mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
    )


def _deepseek_v2_lite() -> PretrainedConfig:
    return AutoConfig.for_model(
        "deepseek_v2", hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, topk_method="greedy",
    )


def _gpt_oss_20b() -> PretrainedConfig:
    return AutoConfig.for_model(
        "gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        vocab_size=201088,
    )


def _qwen3_235b() -> PretrainedConfig:
    # 470 GB in bf16: for planning (`hf-moe-accel plan`, built on the meta device), not for one GPU.
    return AutoConfig.for_model(
        "qwen3_moe", hidden_size=4096, moe_intermediate_size=1536, intermediate_size=12288, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )


def _tiny_qwen3_moe() -> PretrainedConfig:
    return AutoConfig.for_model(
        "qwen3_moe", hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
        vocab_size=4096, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    )


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-qwen3-moe": _tiny_qwen3_moe,
    "olmoe-1b-7b": _olmoe,
    "qwen3-30b-a3b": _qwen3_30b,
    "mixtral-8x7b": _mixtral,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "gpt-oss-20b": _gpt_oss_20b,
    "qwen3-235b-a22b": _qwen3_235b,
}


def build_preset(name: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 overrides: dict | None = None) -> torch.nn.Module:
    """A random-weight model of preset `name`, built directly on `device` in `dtype`, in eval mode.
    `overrides` sets config fields (e.g. fewer layers)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config = PRESETS[name]()
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
