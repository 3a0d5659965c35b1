"""Plain descriptions of what the kernels compute: routing rules and expert weight layouts.

These dataclasses are the contract between `patches/` (which reads a Transformers module and
describes it) and `kernels/` (which computes from the description). They hold no logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Scoring = Literal["softmax", "sigmoid", "softmax_topk_logits"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits [T, E] into (weights [T, k], expert ids [T, k]).

    scoring:
        "softmax"             probs = softmax(logits) in float32, top-k over probs (+bias if any).
        "sigmoid"             probs = sigmoid(logits) in float32, top-k over probs (+bias if any).
        "softmax_topk_logits" top-k over the raw logits, then softmax over the k chosen logits
                              (GPT-OSS); the softmax runs in float32, then `weights_dtype`.
    renormalize:        divide the k weights by their sum (+ renorm_eps) after selection.
    n_group/topk_group: group-limited top-k: experts split into n_group groups, each group scored
                        by `group_score` over (probs + correction bias), only the best topk_group
                        groups are eligible. n_group == 1 disables it.
    has_correction_bias: a per-expert bias added to probs for *selection only* (DeepSeek-V3); the
                        weights are gathered from the unbiased probs.
    routed_scaling_factor: multiplies the final weights.
    weights_dtype:      None keeps float32 weights; otherwise the weights are cast to this dtype
                        at the end (the stock router casts to the logits' dtype).
    expert_threshold:   0 disables it. Otherwise, after selection, each token drops the chosen experts
                        whose normalised weight w_i / sum_j w_j (over its k, before renormalisation
                        and scaling) is under it; the largest (the first on a tie) is always kept. A
                        dropped expert gets id -1 and weight 0 ("no expert"). The kept weights are then
                        renormalised the way the family does: by their sum (+ renorm_eps) when
                        `renormalize`, by their sum for "softmax_topk_logits" (a softmax over the kept
                        logits), not at all otherwise.
    """

    top_k: int
    num_experts: int
    scoring: Scoring = "softmax"
    renormalize: bool = False
    renorm_eps: float = 0.0
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    has_correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    weights_dtype: torch.dtype | None = None
    expert_threshold: float = 0.0


ActivationKind = Literal["silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_clamped", "swiglu_post_clamped"]
# The kinds that clip gate and up to `limit`; all need a gate.
CLAMPED_SWIGLUS = ("swiglu_oai", "swiglu_clamped", "swiglu_post_clamped")


@dataclass(frozen=True)
class Activation:
    """The elementwise step between the two expert GEMMs.

    With a gate: out = act(gate) * up for silu/gelu/gelu_tanh/relu/relu2 ("relu2" is the squared ReLU,
    relu(x)**2). "swiglu_oai" and "swiglu_clamped" first clip gate = min(gate, limit), up = clamp(up, -limit, limit):
    "swiglu_oai" (GPT-OSS) then computes out = (up + 1) * gate * sigmoid(alpha * gate);
    "swiglu_clamped" (DeepSeek-V4, GLM-5-Next, HY-V4) out = silu(gate) * up.
    "swiglu_post_clamped" (Bailing-Hybrid, Step3p7) clips the gate after its activation instead:
    out = min(silu(gate), limit) * clamp(up, -limit, limit).
    Without a gate (has_gate=False): out = act(up) (relu2 for Nemotron-H); the SwiGLUs need a gate.
    `alpha` is read by "swiglu_oai" only, `limit` by the three SwiGLUs.
    """

    kind: ActivationKind = "silu"
    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class BlockScales:
    """The per-block scales of block-quantized (FP8) expert weights, as Transformers' fine-grained FP8
    quantizer stores them (`FP8Experts`: `gate_up_proj_scale_inv`, `down_proj_scale_inv`).

    `block_size` is (rows, columns) of one block over the last two axes of the weight *as stored*
    (Transformers' `weight_block_size` / `FP8Experts.block_size`, `[block_n, block_k]` for its
    [E, N, K] weights; usually (128, 128)). Each scale is float32 [E, >= cdiv(rows, b0), >= cdiv(cols, b1)]
    and the weight's real value is `stored[e, r, c] * scale[e, r // b0, c // b1]`: the blocks tile the
    whole stored matrix, so a size that is not a multiple of the block ends in a partial block with
    its own scale, and gate and up rows of a concatenated gate_up share a block where the 2I axis
    puts them in one (Transformers' own dequantization, `_dequantize_fp8_weight`, reads it so).
    Rows of the grid past cdiv are ignored (Transformers allocates at least two for gate_up).
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class MxScales:
    """The e8m0 scales of MXFP4 expert weights (OCP microscaling, gpt-oss's checkpoint format).

    With these, `ExpertWeights.gate_up` and `.down` hold packed e2m1 values, uint8 [E, N, K // 2]
    (not transposed: gate_up [E, 2I, H // 2], down [E, H, I // 2]): byte j of a row holds value 2j in
    its low nibble and value 2j + 1 in its high one. Each scale is uint8 [E, N, K // 32], one per 32
    consecutive values of a row, and the real value is e2m1(nibble) * 2 ** (scale - 127); K is a
    multiple of 32 (the format has no partial group).
    """

    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class ExpertWeights:
    """References (never copies) to one MoE layer's expert tensors and how they are laid out.

    Not transposed (the Transformers default): gate_up [E, 2I, H] (or [E, I, H] without a gate),
    down [E, H, I]. Transposed: gate_up [E, H, 2I], down [E, I, H].
    Along the 2I axis the gate comes first then up ("concatenated"), or they alternate
    gate0, up0, gate1, up1, ... ("interleaved", GPT-OSS).
    Biases, when present: gate_up_bias [E, 2I] (same order as the weight), down_bias [E, H].
    `scales`, when present, says the weights are block-quantized (FP8 storage, see `BlockScales`):
    the kernels dequantize them and compute in the activations' dtype.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    transposed: bool = False
    interleaved: bool = False
    has_gate: bool = True
    activation: Activation = Activation()
    scales: BlockScales | None = None
    mx_scales: MxScales | None = None  # MXFP4 storage (see MxScales): two values per byte along K

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[2] if self.transposed else self.down.shape[1]

    @property
    def intermediate_size(self) -> int:
        if self.mx_scales is not None:  # packed: two values per byte
            return 2 * self.down.shape[2]
        return self.down.shape[1] if self.transposed else self.down.shape[2]


@dataclass(frozen=True)
class ExpertAddresses:
    """Where each expert's weights start, by expert id: int64 byte addresses [E] on the kernels' device,
    for `fused_experts_at`. An address may point into GPU memory (an expert cache slot) or into pinned
    host memory, which a CUDA kernel reads over PCIe through unified virtual addressing (zero-copy).
    Every expert's tensors have the per-expert layout (strides after the first) of the `layout`
    weights passed beside them. Block-scaled (FP8) layouts need their scales' addresses too
    (`gate_up_scale`, `down_scale`, in the layout of `layout.scales`): an expert's scales live
    wherever its weights do, so each is looked up the same way."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def row_addresses(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Byte addresses (int64, on the CPU) of `tensor[row]` for each of `rows`; nothing is copied."""
    rows = rows.to(device="cpu", dtype=torch.int64)
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < tensor.shape[0]):
        raise IndexError(f"rows {int(rows.min())}..{int(rows.max())} of a tensor of {tensor.shape[0]} rows")
    return tensor.data_ptr() + rows * (tensor.stride(0) * tensor.element_size())


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` carries the layout flags of Transformers' experts decorator."""
    return all(hasattr(module, flag) for flag in ("is_transposed", "is_concatenated", "has_bias", "has_gate"))
