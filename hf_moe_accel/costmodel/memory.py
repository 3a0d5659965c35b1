"""GPU memory budgets: parse "24GiB" / "512MB" / bytes, and split a budget between the non-expert
weights, a reserve (KV cache, activations, workspace) and as many expert slots as fit in the rest."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

# Decimal units as in "512MB", binary as in "24GiB" (the convention of accelerate's max_memory).
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
# Fixed allowance beside the estimated activations: cuBLAS workspaces, Triton launch buffers, the
# small per-step tensors of the offload engine.
_WORKSPACE_MARGIN = 128 * 2**20


def parse_memory_size(value: str | int) -> int:
    """Bytes from an int (bytes) or a string such as "24GiB", "512MB", "1.5GB", "4096"."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"a memory size is an int (bytes) or a string such as '24GiB', got {type(value).__name__}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or (unit and unit not in _UNITS):
            units = "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
            raise ValueError(f"can't read memory size {value!r}: expected a number and a unit among {units}, e.g. '24GiB'")
        size = int(float(match.group(1)) * _UNITS[unit or "b"])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def format_bytes(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def reserve_bytes(config: PretrainedConfig, dtype: torch.dtype, *, kv_cache_tokens: int, prefill_tokens: int,
                  expert_inner: int) -> int:
    """An estimate of the GPU memory beside the weights: KV cache for `kv_cache_tokens` tokens (all
    sequences of a generate() call, prompt and new tokens), activations of a forward over
    `prefill_tokens` tokens, and a fixed workspace margin.

    Reads the common config names (num_key_value_heads, head_dim, the MLA head dims); a family that
    stores its cache differently may need an explicit reserve (OffloadOptions.reserve).
    """
    text = config.get_text_config()
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    nope, rope = getattr(text, "qk_nope_head_dim", None), getattr(text, "qk_rope_head_dim", None)
    key_dim = int(getattr(text, "qk_head_dim", None) or ((nope + rope) if nope and rope else head_dim))
    value_dim = int(getattr(text, "v_head_dim", None) or head_dim)
    layers = int(text.num_hidden_layers)
    element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    kv_cache = kv_cache_tokens * layers * kv_heads * (key_dim + value_dim) * element

    top_k = int(getattr(text, "num_experts_per_tok", None) or 8)
    # Per token, in float32 at worst: ~16 hidden-sized temporaries (residual, norms, MoE output
    # accumulators), q/k/v/attention output, the experts' intermediate for its k pairs.
    per_token = 4 * (16 * hidden + 2 * (heads + 2 * kv_heads) * max(key_dim, value_dim) + 2 * top_k * expert_inner)
    # generate() computes the last position's logits: a few float32 copies for up to 64 sequences.
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    logits = 4 * 4 * min(prefill_tokens, 64) * vocab
    return kv_cache + prefill_tokens * per_token + logits + _WORKSPACE_MARGIN


@dataclass(frozen=True)
class SlotBudget:
    """How a GPU budget is spent: non-expert weights, the reserve, and expert slots per MoE layer."""

    budget: int
    non_expert: int
    reserve: int
    expert_bytes: tuple[int, ...]  # one expert of each MoE layer, all its tensors
    num_experts: tuple[int, ...]
    slots: tuple[int, ...]  # expert slots of each MoE layer

    @property
    def minimum(self) -> int:
        """The smallest budget that runs: non-expert weights and the reserve, no slot."""
        return self.non_expert + self.reserve

    @property
    def slot_bytes(self) -> int:
        return sum(s * b for s, b in zip(self.slots, self.expert_bytes))

    @property
    def total(self) -> int:
        return self.non_expert + self.reserve + self.slot_bytes

    def describe(self) -> str:
        cached = sum(self.slots) / max(1, sum(self.num_experts))
        return (
            f"budget {format_bytes(self.budget)}: non-expert weights {format_bytes(self.non_expert)}, reserve "
            f"{format_bytes(self.reserve)}, {sum(self.slots)} expert slots {format_bytes(self.slot_bytes)} "
            f"({100 * cached:.1f}% of the experts)"
        )


def split_budget(budget: int, non_expert: int, reserve: int, expert_bytes: Sequence[int], num_experts: Sequence[int],
                slots_per_layer: int | None = None) -> SlotBudget:
    """Slots for each layer: the same count everywhere (at most the layer's experts), then one more
    for the first layers while the remainder allows. `slots_per_layer` asks for fewer (a sweep);
    more than fit raises. A budget below non-expert weights + reserve raises ValueError."""
    plan = SlotBudget(budget, non_expert, reserve, tuple(expert_bytes), tuple(num_experts), (0,) * len(expert_bytes))
    free = budget - plan.minimum
    if free < 0:
        raise ValueError(
            f"gpu_memory={format_bytes(budget)} is too small: the non-expert weights need {format_bytes(non_expert)} and "
            f"the KV cache, activations and workspace {format_bytes(reserve)} (OffloadOptions kv_cache_tokens, "
            f"prefill_tokens or reserve set this), so at least {format_bytes(plan.minimum)} is needed, plus "
            f"{format_bytes(max(expert_bytes, default=0))} per cached expert"
        )
    base = min(free // max(1, sum(expert_bytes)), min(num_experts, default=0))
    slots = [base] * len(expert_bytes)
    free -= base * sum(expert_bytes)
    for i, size in enumerate(expert_bytes):
        if slots[i] < num_experts[i] and size <= free:
            slots[i] += 1
            free -= size
    if slots_per_layer is not None:
        if slots_per_layer < 0:
            raise ValueError(f"slots_per_layer must be >= 0, got {slots_per_layer}")
        if slots and slots_per_layer > min(slots):
            raise ValueError(
                f"slots_per_layer={slots_per_layer} doesn't fit: gpu_memory={format_bytes(budget)} leaves room for "
                f"{min(slots)} expert slots per layer (of {min(num_experts)} experts)"
            )
        slots = [slots_per_layer] * len(expert_bytes)
    return SlotBudget(budget, non_expert, reserve, tuple(expert_bytes), tuple(num_experts), tuple(slots))


MIN_BUCKET = 256  # the shortest static KV cache graph decode allocates


def length_bucket(max_cache_len: int) -> int:
    """The cache length allocated for a generation needing `max_cache_len`: a power of two >= 256.

    Rounding up lets generations of different lengths share one cache and its graphs; the cost is
    attention over at most twice the needed length (masked), small beside the expert weights.
    """
    bucket = MIN_BUCKET
    while bucket < max_cache_len:
        bucket *= 2
    return bucket
