"""The sizes the predictor needs from a model: read off the module tree, never from real weights.

A preset or a checkpoint's config is built on the meta device (no memory, a few seconds even for
235B parameters), so planning never instantiates weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..kernels.spec import is_experts_module

_ATTENTION_NAMES = ("self_attn", "attention", "attn")


@dataclass(frozen=True)
class ModelShape:
    """Bytes and counts of one model, as the cost model reads them (dtype_bytes per element).

    expert_bytes        one routed expert of one layer (all its tensors)
    attention_bytes     all layers' attention weights (what tensor parallel shards by heads)
    other_bytes         the rest of the layers: norms, routers, shared experts, dense MLPs (replicated)
    embedding_bytes     the input embedding table (a step gathers `batch` rows of it)
    lm_head_bytes       the output projection (streamed whole each step; shares memory when tied)
    kv_bytes_per_token  KV cache bytes per token of context, summed over full-attention layers
    window_kv_bytes_per_token / sliding_window: the same for sliding-window layers, capped at the window
    qkvo_attention      every layer's attention is plain q/k/v/o projections (tensor parallel shards it)
    expert_biases       the experts have bias vectors (zero-copy offload decode reads experts without them)
    """

    name: str
    num_layers: int
    moe_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k: int
    expert_inner: int
    dtype_bytes: int
    expert_bytes: float
    attention_bytes: float
    other_bytes: float
    embedding_bytes: float
    lm_head_bytes: float
    tied_embeddings: bool
    kv_bytes_per_token: float
    window_kv_bytes_per_token: float
    sliding_window: int
    qkvo_attention: bool
    expert_biases: bool = False

    @property
    def experts_total_bytes(self) -> float:
        return self.moe_layers * self.num_experts * self.expert_bytes

    @property
    def non_expert_bytes(self) -> float:
        """Weights outside the routed experts, in memory (a tied head counted once)."""
        head = 0.0 if self.tied_embeddings else self.lm_head_bytes
        return self.attention_bytes + self.other_bytes + self.embedding_bytes + head

    @property
    def total_bytes(self) -> float:
        return self.non_expert_bytes + self.experts_total_bytes

    def kv_bytes(self, batch: int, context: int) -> float:
        """KV cache bytes of `batch` sequences of `context` tokens."""
        windowed = min(context, self.sliding_window) if self.sliding_window else context
        return batch * (self.kv_bytes_per_token * context + self.window_kv_bytes_per_token * windowed)

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_layers} layers ({self.moe_layers} MoE), hidden {self.hidden_size}, "
            f"{self.num_experts} experts top-{self.top_k} (inner {self.expert_inner}), "
            f"{self.total_bytes / 2**30:.1f} GiB of weights ({self.experts_total_bytes / 2**30:.1f} GiB experts)"
        )


def _nbytes(module: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in no_split]
    if not layers:
        raise ValueError(f"can't find the decoder layers of {type(model).__name__} (no _no_split_modules)")
    return layers


def _attention(layer: nn.Module) -> nn.Module | None:
    for name in _ATTENTION_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def is_qkvo_attention(module: nn.Module | None) -> bool:
    return module is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def _kv_per_token(attention: nn.Module | None, config, dtype_bytes: int) -> float:
    if is_qkvo_attention(attention):
        return float((attention.k_proj.out_features + attention.v_proj.out_features) * dtype_bytes)
    if getattr(config, "kv_lora_rank", None):  # MLA: Transformers caches the expanded keys and values
        heads = config.num_attention_heads
        return float(heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * dtype_bytes)
    return 0.0  # linear attention / state-space layers: a fixed-size state, not a growing cache


def shape_of_model(model: nn.Module, name: str | None = None) -> ModelShape:
    """Sizes of a loaded (or meta-device) Transformers MoE model."""
    config = model.config.get_text_config()
    experts = [m for m in model.modules() if is_experts_module(m)]
    if not experts:
        raise ValueError(f"no MoE block found in {type(model).__name__}: the planner handles Mixture-of-Experts models only")
    first = experts[0]
    gate_up = first.gate_up_proj if first.has_gate else first.up_proj
    num_experts = gate_up.shape[0]
    expert_inner = first.down_proj.shape[1] if first.is_transposed else first.down_proj.shape[2]
    expert_bytes = sum(_nbytes(m) for m in experts) / (len(experts) * num_experts)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    dtype_bytes = embedding.weight.element_size()

    layers = _decoder_layers(model)
    attentions = [_attention(layer) for layer in layers]
    attention_bytes = sum(_nbytes(a) for a in attentions if a is not None)
    expert_total = sum(_nbytes(m) for m in experts)
    head_bytes = _nbytes(head) if head is not None else 0.0
    other = _nbytes(model) - expert_total - attention_bytes - _nbytes(embedding) - (0.0 if tied else head_bytes)

    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    window = getattr(config, "sliding_window", None) or 0
    full_kv = window_kv = 0.0
    for attention, kind in zip(attentions, layer_types):
        per_token = _kv_per_token(attention, config, dtype_bytes)
        if kind == "sliding_attention" and window:
            window_kv += per_token
        elif kind != "linear_attention":
            full_kv += per_token
    num_heads = config.num_attention_heads
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
        num_layers=len(layers),
        moe_layers=len(experts),
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        vocab_size=config.vocab_size,
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        expert_inner=expert_inner,
        dtype_bytes=dtype_bytes,
        expert_bytes=expert_bytes,
        attention_bytes=attention_bytes,
        other_bytes=other,
        embedding_bytes=_nbytes(embedding),
        lm_head_bytes=head_bytes,
        tied_embeddings=tied,
        kv_bytes_per_token=full_kv,
        window_kv_bytes_per_token=window_kv,
        sliding_window=window if window_kv else 0,
        qkvo_attention=all(is_qkvo_attention(a) for a in attentions),
        expert_biases=any(getattr(first, name, None) is not None for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")),
    )


def shape_of_config(config, name: str, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """Sizes of the model a config describes, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return shape_of_model(model, name)


def load_shape(spec: str, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """`--model`: a preset name of `hf_moe_accel.costmodel.presets`, or a checkpoint folder (its config only)."""
    from .presets import PRESETS

    if spec in PRESETS:
        return shape_of_config(PRESETS[spec](), spec, dtype)
    if Path(spec).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
        return shape_of_config(config, Path(spec).name, dtype)
    raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")
