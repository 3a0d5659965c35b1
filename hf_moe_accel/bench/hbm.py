"""The HBM limit of a decode step: the fewest bytes one step must read, over copy bandwidth."""

from __future__ import annotations

from torch import nn

from ..kernels.spec import is_experts_module


def expert_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def decode_step_bytes(model: nn.Module, batch: int, context_len: int) -> float:
    """Non-expert weights + expected distinct experts touched (uniform routing) + KV cache read.

    Random-weight models route near-uniformly, so each layer touches E * (1 - (1 - k/E)^batch)
    experts in expectation. The KV term is an estimate from the config (full K and V per head).
    """
    config = model.config.get_text_config()
    experts = expert_layers(model)
    expert_ids = {id(p) for m in experts for p in m.parameters()}
    non_expert = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_ids)
    # The embedding table is gathered, not streamed: only `batch` rows are read.
    embed = model.get_input_embeddings().weight
    non_expert -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    top_k = config.num_experts_per_tok
    expert_bytes = 0.0
    for module in experts:
        num_experts = module.gate_up_proj.shape[0] if module.has_gate else module.up_proj.shape[0]
        per_expert = sum(p.numel() * p.element_size() for p in module.parameters()) / num_experts
        touched = num_experts * (1 - (1 - top_k / num_experts) ** batch)
        expert_bytes += touched * per_expert
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dtype_bytes = embed.element_size()
    kv_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * context_len * batch * dtype_bytes
    return non_expert + expert_bytes + kv_bytes
