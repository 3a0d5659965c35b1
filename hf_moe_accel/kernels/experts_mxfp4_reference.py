"""MXFP4 expert weights in plain torch: dequantize, and the fused-experts oracle.

The layout is `spec.MxScales`: packed e2m1 nibbles (low nibble first) with one e8m0 scale per 32
values of a row. `dequantize_mxfp4` follows Transformers' own `convert_moe_packed_tensors` step by
step (a lookup table in the target dtype, then `ldexp` by scale - 127 in that dtype), so that its
result is bit-equal to Transformers' load-time dequantization in every dtype, underflow included;
it returns the weights untransposed ([.., N, K]), where Transformers transposes them for gpt-oss's
bf16 layout. `experts_mxfp4_reference` dequantizes the experts a call uses to the activations' dtype
and runs `experts_reference` on them: the routing, activation, biases and top-k sum of the bf16 path.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .experts_reference import experts_reference, used_experts
from .spec import ExpertWeights, MxScales

MX_GROUP = 32  # values per e8m0 scale (OCP MX)
E8M0_BIAS = 127
# e2m1 by nibble: sign bit 3, then exponent bits 2..1 and one mantissa bit (Transformers' FP4_VALUES).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed [..., N, K // 2] uint8 and scales [..., N, K // 32] uint8 -> [..., N, K] in `dtype`."""
    rows = blocks.shape[:-1]
    groups = scales.shape[-1]
    if scales.shape[:-1] != rows or blocks.shape[-1] != groups * (MX_GROUP // 2):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected "
                         f"[..., N, 16 * G] packed bytes for [..., N, G] scales")
    packed = blocks.to(torch.uint8).reshape(*rows, groups, MX_GROUP // 2)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(*rows, groups, MX_GROUP, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(packed & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(packed >> 4).to(torch.int)]
    exponent = (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
    torch.ldexp(out, exponent, out=out)  # in `dtype`, as Transformers does: same rounding and underflow
    return out.reshape(*rows, groups * MX_GROUP)


def check_mx_scales(weights: ExpertWeights) -> MxScales:
    """The weights' `MxScales`, after checking them against the weights; ValueError names what is wrong."""
    scales = weights.mx_scales
    if scales is None:
        raise ValueError("these expert weights carry no MXFP4 scales")
    if weights.transposed or weights.scales is not None:
        raise ValueError("MXFP4 weights are stored [E, N, K // 2] (not transposed) and carry no FP8 block scales")
    for name, weight, scale in (("gate_up", weights.gate_up, scales.gate_up), ("down", weights.down, scales.down)):
        if weight.dtype != torch.uint8 or scale.dtype != torch.uint8:
            raise ValueError(f"MXFP4 {name}: blocks {weight.dtype} and scales {scale.dtype}; both must be uint8")
        if weight.dim() != 3 or scale.shape != (*weight.shape[:2], weight.shape[2] * 2 // MX_GROUP) \
                or weight.shape[2] % (MX_GROUP // 2):
            raise ValueError(f"MXFP4 {name}: blocks {tuple(weight.shape)} and scales {tuple(scale.shape)} are not "
                             "[E, N, 16 * G] and [E, N, G]")
        if scale.device != weight.device:
            raise ValueError(f"MXFP4 {name}: scales on {scale.device}, blocks on {weight.device}")
    return scales


def dequantize_mxfp4_weights(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
    """MXFP4 `weights` as plain ones of `dtype` (every expert; scales dropped)."""
    scales = check_mx_scales(weights)
    return replace(weights, mx_scales=None, gate_up=dequantize_mxfp4(weights.gate_up, scales.gate_up, dtype),
                   down=dequantize_mxfp4(weights.down, scales.down, dtype))


def experts_mxfp4_reference(
    hidden_states: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """`experts_reference` on MXFP4 weights: [T, H] in hidden_states' dtype.

    Only the experts some pair uses are dequantized (to hidden_states' dtype), so the transient memory is
    that of the experts hit, not of the layer. Ids of -1 add nothing, as in the bf16 path.
    """
    scales = check_mx_scales(weights)
    used, local_ids = used_experts(topk_ids)
    dtype = hidden_states.dtype
    dense = replace(
        weights, mx_scales=None,
        gate_up=dequantize_mxfp4(weights.gate_up[used], scales.gate_up[used], dtype),
        down=dequantize_mxfp4(weights.down[used], scales.down[used], dtype),
        # Biases (float32 in Transformers' MXFP4 module) in the activations' dtype, as a model dequantized
        # at load holds them.
        gate_up_bias=weights.gate_up_bias[used].to(dtype) if weights.gate_up_bias is not None else None,
        down_bias=weights.down_bias[used].to(dtype) if weights.down_bias is not None else None,
    )
    return experts_reference(hidden_states, dense, local_ids, topk_weights)
