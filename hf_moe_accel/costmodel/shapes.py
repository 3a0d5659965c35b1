"""The sizes the predictor needs from a model: read off the module tree, never from real weights.

A preset or a checkpoint's config is built on the meta device (no memory, a few seconds even for
235B parameters), so planning never instantiates weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..kernels.spec import is_experts_module

_ATTENTION_NAMES = ("self_attn", "attention", "attn")

# How weights are stored: "model" in the model's dtype (`dtype_bytes` per element), "fp8" as
# block-scaled float8 (1 byte per weight and one float32 scale per FP8_BLOCK x FP8_BLOCK block of each
# matrix, partial blocks at the edges included: Transformers' fine-grained FP8 layout).
WeightFormat = Literal["model", "fp8"]
WEIGHT_FORMATS: tuple[str, ...] = ("model", "fp8")
# The block `expert_dtype="fp8"` quantizes in (Transformers' FineGrainedFP8Config default).
FP8_BLOCK = 128
FP8_WEIGHT_BYTES = 1
FP8_SCALE_BYTES = 4
_FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


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
    expert_format       how the routed experts' weight matrices are stored (WeightFormat); `expert_bytes`
                        counts them so, scales included, biases in the model dtype
    expert_matrices     (rows, columns) of each weight matrix of one expert (gate/up, down), to count it
                        in another format
    expert_params       weights of one expert (2 FLOPs per token each); 0: expert_bytes / dtype_bytes
    expert_block        FP8: columns of the expert's inner dimension one scale block spans; tensor
                        parallel cuts on whole blocks (0: plain weights, cut on any column)
    expert_gate_up_stacked  gate rows then up rows in one matrix (a block over both can't be cut apart)
    attention_format    how the attention projections are stored (`attention_bytes` counts them so)
    attention_params    weights of all layers' attention; 0: attention_bytes / dtype_bytes
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
    expert_format: WeightFormat = "model"
    expert_matrices: tuple[tuple[int, int], ...] = ()
    expert_params: float = 0.0
    expert_block: int = 0
    expert_gate_up_stacked: bool = False
    attention_format: WeightFormat = "model"
    attention_params: float = 0.0

    @property
    def expert_weight_params(self) -> float:
        """Weights of one routed expert (what its matmuls multiply by)."""
        return self.expert_params or self.expert_bytes / self.dtype_bytes

    @property
    def attention_weight_params(self) -> float:
        return self.attention_params or self.attention_bytes / self.dtype_bytes

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
            f"{self.total_bytes / 2**30:.1f} GiB of weights ({self.experts_total_bytes / 2**30:.1f} GiB experts"
            f"{_format_note(self.expert_format)}; attention {self.attention_bytes / 2**30:.1f} GiB"
            f"{_format_note(self.attention_format)}; the rest in {8 * self.dtype_bytes}-bit)"
        )


def _format_note(fmt: str) -> str:
    if fmt == "fp8":
        return f" in FP8: 1 byte per weight + a float32 scale per {FP8_BLOCK}x{FP8_BLOCK} block"
    return ""


def fp8_matrix_bytes(rows: int, cols: int, block: int = FP8_BLOCK) -> int:
    """Bytes of one rows x cols matrix in block-scaled FP8: its weights, and one scale per block."""
    scales = math.ceil(rows / block) * math.ceil(cols / block)
    return rows * cols * FP8_WEIGHT_BYTES + scales * FP8_SCALE_BYTES


def _attention_matrices(shape: ModelShape) -> tuple[tuple[int, int], ...]:
    """(rows, columns) of one layer's q, k, v and o projections."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    h = shape.hidden_size
    return ((q, h), (kv, h), (kv, h), (h, q))


def with_fp8(shape: ModelShape, *, attention: bool = False) -> ModelShape:
    """`shape` with its routed experts' weight matrices in block-scaled FP8 (what `expert_dtype="fp8"`
    makes of them), and with `attention`, its q/k/v/o projections too (as fine-grained FP8 checkpoints
    store them). Everything else (biases, norms, routers, shared experts, embedding, head, KV cache,
    activations) stays in the model's dtype. A part already in FP8 is kept as it is."""
    changes: dict = {}
    if shape.expert_format != "fp8":
        if not shape.expert_matrices:
            raise ValueError(f"{shape.name}: the expert matrices' sizes are unknown, so their FP8 bytes can't be counted")
        params = sum(r * c for r, c in shape.expert_matrices)
        rest = shape.expert_bytes - params * shape.dtype_bytes  # biases stay in the model dtype
        changes.update(
            expert_format="fp8",
            expert_bytes=float(sum(fp8_matrix_bytes(r, c) for r, c in shape.expert_matrices) + rest),
            expert_params=float(params),
            expert_block=FP8_BLOCK,
        )
    if attention and shape.attention_format != "fp8":
        if not shape.qkvo_attention:
            raise ValueError(f"{shape.name}: FP8 attention is counted for q/k/v/o projections only; this model's "
                             "attention has another layout")
        matrices = _attention_matrices(shape)
        params = shape.num_layers * sum(r * c for r, c in matrices)
        rest = shape.attention_bytes - params * shape.dtype_bytes  # biases, q/k norms
        changes.update(
            attention_format="fp8",
            attention_bytes=float(shape.num_layers * sum(fp8_matrix_bytes(r, c) for r, c in matrices) + rest),
            attention_params=float(params),
        )
    return dataclasses.replace(shape, **changes)


def _nbytes(module: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def _float8_params(module: nn.Module) -> float:
    return float(sum(p.numel() for p in module.parameters() if p.dtype in _FLOAT8_DTYPES))


def _expert_layout(experts: nn.Module) -> tuple[tuple[tuple[int, int], ...], int, int]:
    """(rows, columns) of one expert's gate/up and down matrices, its inner size, and for float8 weights
    the columns of the inner dimension a scale block spans (0 for plain weights).

    The block is the module's `block_size` (Transformers' FP8Experts); without one, the inner size over
    down's scale blocks along it. Gate/up rows interleaved (a gate and an up row per column) halve its
    block's extent; the cut must keep both projections' blocks whole: their least common multiple."""
    gate_up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    down = experts.down_proj
    inner_axis = -2 if experts.is_transposed else -1
    inner = down.shape[inner_axis]
    matrices = (tuple(gate_up.shape[-2:]), tuple(down.shape[-2:]))
    if down.dtype not in _FLOAT8_DTYPES:
        return matrices, inner, 0
    block = getattr(experts, "block_size", None)
    if block is None or len(block) != 2:
        scale = getattr(experts, "down_proj_scale_inv", None)
        blocks = scale.shape[inner_axis] if isinstance(scale, torch.Tensor) and scale.dim() >= 2 else 1
        return matrices, inner, -(-inner // blocks)
    rows, cols = int(block[0]), int(block[1])
    down_step, gate_up_step = (rows, cols) if experts.is_transposed else (cols, rows)
    if experts.has_gate and not experts.is_concatenated:
        gate_up_step //= math.gcd(gate_up_step, 2)
    return matrices, inner, math.lcm(down_step, gate_up_step)


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
    matrices, expert_inner, expert_block = _expert_layout(first)
    expert_bytes = sum(_nbytes(m) for m in experts) / (len(experts) * num_experts)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    dtype_bytes = embedding.weight.element_size()

    layers = _decoder_layers(model)
    attentions = [_attention(layer) for layer in layers]
    attention_bytes = sum(_nbytes(a) for a in attentions if a is not None)
    attention_fp8 = any(_float8_params(a) for a in attentions if a is not None)
    attention_params = float(sum(p.numel() for a in attentions if a is not None
                                 for n, p in a.named_parameters() if not n.endswith("_scale_inv")))  # weights, not scales
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
        # Experts or attention stored in float8 (an FP8 checkpoint): their bytes above are already FP8's.
        expert_format="fp8" if expert_block else "model",
        expert_matrices=matrices,
        expert_params=float(sum(r * c for r, c in matrices)) if expert_block else 0.0,
        expert_block=expert_block,
        expert_gate_up_stacked=first.has_gate and first.is_concatenated,
        attention_format="fp8" if attention_fp8 else "model",
        attention_params=attention_params if attention_fp8 else 0.0,
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
        shape = shape_of_config(config, Path(spec).name, dtype)
        # Built from its config on the meta device, a fine-grained FP8 checkpoint's weights come out in
        # `dtype`: counted as it stores them, experts and attention projections in FP8.
        return with_fp8(shape, attention=shape.qkvo_attention) if is_fp8_checkpoint(config) else shape
    raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")


def is_fp8_checkpoint(config) -> bool:
    """Whether a checkpoint's config declares Transformers' fine-grained FP8 quantization."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)) == "fp8"
