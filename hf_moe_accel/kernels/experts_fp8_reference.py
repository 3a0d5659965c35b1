"""Block-scaled FP8 expert weights in plain torch: quantize, dequantize, and the fused-experts oracle.

The layout is Transformers' fine-grained FP8 one (`spec.BlockScales`): float8_e4m3fn weights, one
float32 `scale_inv` per (b0 x b1) block of the stored matrix, real value = stored x scale, the block
grid taken with ceiling division so that sizes that are not a multiple of the block end in a partial
block. `experts_fp8_reference` dequantizes the experts a call uses (in float32, then cast to the
activations' dtype, as Transformers' load-time dequantization does) and runs `experts_reference` on
them: the same routing, activation and top-k sum as the bf16 path. Activations stay in their dtype
(weight-only FP8); Transformers' own FP8 matmul also quantizes activations per (token, 128-column
group), which this oracle deliberately does not: it is what the fused kernels compute.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .experts_reference import experts_reference, used_experts
from .spec import BlockScales, ExpertWeights

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448: the quantizer maps each block's absmax here


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_block_scales(weights: ExpertWeights) -> BlockScales:
    """The weights' `BlockScales`, after checking them against the weights; ValueError names what is wrong."""
    scales = weights.scales
    if scales is None:
        raise ValueError("these expert weights carry no block scales")
    b0, b1 = scales.block_size
    if not (isinstance(b0, int) and isinstance(b1, int) and b0 > 0 and b1 > 0):
        raise ValueError(f"block_size must be two positive ints, got {scales.block_size!r}")
    for name, weight, scale in (("gate_up", weights.gate_up, scales.gate_up), ("down", weights.down, scales.down)):
        if scale.dtype != torch.float32:
            raise ValueError(f"{name} scales are {scale.dtype}: float32 block scales only (convert UE8M0 "
                             "power-of-two scales to float32 first)")
        if weight.dim() != 3 or scale.dim() != 3 or scale.shape[0] != weight.shape[0]:
            raise ValueError(f"{name}: weight {tuple(weight.shape)} and scales {tuple(scale.shape)} are not "
                             "[E, rows, cols] and [E, row blocks, column blocks] of the same E")
        need = (_cdiv(weight.shape[1], b0), _cdiv(weight.shape[2], b1))
        if scale.shape[1] < need[0] or scale.shape[2] < need[1]:
            raise ValueError(f"{name}: {tuple(scale.shape[1:])} scale blocks for a {tuple(weight.shape[1:])} weight "
                             f"in {b0}x{b1} blocks; needs at least {need}")
        if scale.device != weight.device:
            raise ValueError(f"{name}: scales on {scale.device}, weight on {weight.device}")
    return scales


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """[..., R, C] stored weight times scale[..., r // b0, c // b1], computed in float32, cast to `dtype`."""
    rows, cols = weight.shape[-2:]
    b0, b1 = block_size
    grid = scale[..., : _cdiv(rows, b0), : _cdiv(cols, b1)].float()
    full = grid.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]
    return (weight.float() * full).to(dtype)


def quantize_blocks(weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] weight -> (float8_e4m3fn [..., R, C], float32 scale_inv [..., cdiv(R, b0), cdiv(C, b1)]).

    Transformers' quantizer rule (`Fp8Quantize`): scale = 448 / block absmax (1 for an all-zero block),
    stored = clamp(weight x scale) in e4m3, scale_inv = 1 / scale; the same bits where the sizes are
    multiples of the block. Where they are not, the partial blocks at the end get their own absmax
    (Transformers' quantizer leaves such a tensor unquantized instead).
    """
    rows, cols = weight.shape[-2:]
    b0, b1 = block_size
    grid_rows, grid_cols = _cdiv(rows, b0), _cdiv(cols, b1)
    padded = F.pad(weight.float(), (0, grid_cols * b1 - cols, 0, grid_rows * b0 - rows))  # zeros: absmax unchanged
    tiles = padded.reshape(*weight.shape[:-2], grid_rows, b0, grid_cols, b1)
    absmax = tiles.abs().amax(dim=(-3, -1))
    scale = FP8_MAX / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    stored = (tiles * scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    stored = stored.reshape(padded.shape)[..., :rows, :cols].contiguous()
    return stored, (1.0 / scale).to(torch.float32)


def quantize_expert_weights(weights: ExpertWeights, block_size: tuple[int, int] = (128, 128)) -> ExpertWeights:
    """`weights` with gate_up and down block-quantized to FP8 (`quantize_blocks`); the rest kept as is."""
    gate_up, gate_up_scale = quantize_blocks(weights.gate_up, block_size)
    down, down_scale = quantize_blocks(weights.down, block_size)
    return replace(weights, gate_up=gate_up, down=down, scales=BlockScales(gate_up_scale, down_scale, tuple(block_size)))


def dequantize_expert_weights(weights: ExpertWeights, dtype: torch.dtype) -> ExpertWeights:
    """Block-quantized `weights` as plain ones of `dtype` (every expert; scales dropped)."""
    scales = check_block_scales(weights)
    return replace(weights, scales=None,
                   gate_up=dequantize_blocks(weights.gate_up, scales.gate_up, scales.block_size, dtype),
                   down=dequantize_blocks(weights.down, scales.down, scales.block_size, dtype))


def experts_fp8_reference(
    hidden_states: torch.Tensor,
    weights: ExpertWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """`experts_reference` on block-quantized weights: [T, H] in hidden_states' dtype.

    Only the experts some pair uses are dequantized (to hidden_states' dtype), so the transient
    memory is that of the experts hit, not of the layer. Ids of -1 add nothing, as in the bf16 path.
    """
    scales = check_block_scales(weights)
    used, local_ids = used_experts(topk_ids)
    dtype = hidden_states.dtype
    dense = replace(
        weights, scales=None,
        gate_up=dequantize_blocks(weights.gate_up[used], scales.gate_up[used], scales.block_size, dtype),
        down=dequantize_blocks(weights.down[used], scales.down[used], scales.block_size, dtype),
        gate_up_bias=weights.gate_up_bias[used] if weights.gate_up_bias is not None else None,
        down_bias=weights.down_bias[used] if weights.down_bias is not None else None,
    )
    return experts_reference(hidden_states, dense, local_ids, topk_weights)
