"""Group-wise int4 host copies of offloaded experts (`OffloadOptions(host_dtype="int4")`), read for the
misses computed on the CPU instead of the full-precision host copy. Lossy; off by default.

Format, per weight matrix in the [out, in] orientation (F.linear's; transposed layouts are turned):
groups of `INT4_GROUP` consecutive values along the input dim, each asymmetric: q = round((w - min) /
scale) in [0, 15], with scale = (max - min) / 15 and min kept as float32 per group, so a value comes
back as min + q * scale within scale / 2. Two values per byte, value 2j in byte j's low nibble and
2j + 1 in its high one (the packing of `kernels.spec.MxScales`). An input dim that isn't a multiple of
the group ends in a zero-padded group.

Why 32 along the input dim: a group then spans one dot product's slice, so a dequantized row is the
row's own numbers (no mixing across outputs), and 32 keeps the error of an outlier to its 32
neighbours; it divides every expert input dim in use (hidden and intermediate sizes are multiples of
32), and costs 64 bits of scale and min per 32 values (6 bits a weight in all, against 16 for bf16).
Asymmetric, because expert weight groups are seldom centred on 0 and int4 has only 16 levels:
spanning [min, max] instead of [-absmax, absmax] halves the step of a one-sided group. Float32 scale
and min keep the error bound exact (a rounded scale could leave the max outside the 16 levels).

Biases stay as stored (small); the GPU slots keep full precision, so fetches copy the full-precision
host copy, which stays in host memory beside the int4 one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.spec import ExpertWeights

INT4_GROUP = 32
HOST_DTYPES = ("int4",)
_LEVELS = 15  # int4 codes 0..15


@dataclass(frozen=True)
class Int4Matrix:
    """One [E, out, in] weight as int4: packed uint8 [E, out, padded_in / 2], scale and min float32
    [E, out, padded_in / INT4_GROUP]."""

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    in_features: int

    def dequantize(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s [out, in] matrix in `dtype` (a transient copy)."""
        return dequantize_int4(self.packed[expert], self.scale[expert], self.minimum[expert], self.in_features).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))


@dataclass(frozen=True)
class Int4Experts:
    """A layer's int4 host copies: gate_up [E, 2I, H] and down [E, H, I] as `Int4Matrix` ([out, in])."""

    gate_up: Int4Matrix
    down: Int4Matrix

    def matrices(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up and down of one expert, dequantized to `dtype`, in F.linear's [out, in] orientation."""
        return self.gate_up.dequantize(expert, dtype), self.down.dequantize(expert, dtype)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., in] -> (packed uint8 [..., padded_in / 2], scale, min float32 [..., padded_in / group])."""
    if group < 2 or group % 2:
        raise ValueError(f"the int4 group must be an even number of values, got {group}")
    w = weight.float()
    pad = -w.shape[-1] % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    groups = w.view(*w.shape[:-1], -1, group)
    minimum = groups.amin(dim=-1)
    scale = (groups.amax(dim=-1) - minimum) / _LEVELS
    # A constant group has no range: any scale dequantizes it to its min exactly; 1 avoids 0 / 0.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - minimum.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, _LEVELS).to(torch.uint8)
    codes = codes.view(*w.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale, minimum


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, in_features: int) -> torch.Tensor:
    """`quantize_int4`'s output back to float32 [..., in_features]."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(*packed.shape[:-1], -1)
    groups = codes.view(*scale.shape, -1).float()
    values = minimum.unsqueeze(-1) + groups * scale.unsqueeze(-1)
    return values.view(*packed.shape[:-1], -1)[..., :in_features]


def _int4_matrix(weight: torch.Tensor, transposed: bool) -> Int4Matrix:
    """An [E, ...] expert weight as int4 in the [out, in] orientation, one expert at a time (the
    float32 transient stays one expert's size)."""
    parts = [quantize_int4(weight[e].t() if transposed else weight[e]) for e in range(weight.shape[0])]
    packed, scale, minimum = (torch.stack(p) for p in zip(*parts))
    in_features = weight.shape[1] if transposed else weight.shape[2]
    return Int4Matrix(packed, scale, minimum, in_features)


def int4_problem(weights: ExpertWeights) -> str | None:
    """Why these experts can't get int4 host copies, or None."""
    if weights.scales is not None or weights.mx_scales is not None:
        return "host_dtype='int4' quantizes full-precision experts; these are FP8/MXFP4 already (compact on the host)"
    if not weights.gate_up.is_floating_point():
        return f"host_dtype='int4' quantizes floating-point experts, not {weights.gate_up.dtype}"
    return None


@torch.no_grad()
def int4_experts(weights: ExpertWeights) -> Int4Experts:
    """Int4 host copies of a layer's experts (gate and up rows keep their order: concatenated or interleaved)."""
    problem = int4_problem(weights)
    if problem:
        raise ValueError(problem)
    return Int4Experts(_int4_matrix(weights.gate_up, weights.transposed), _int4_matrix(weights.down, weights.transposed))
