"""RMSNorm in one Triton launch, beside its plain-torch reference.

Transformers' RMSNorm modules run about seven kernels each (casts, pow, mean, add, rsqrt, two
multiplies); a decode step of a 48-layer model runs ~200 of them, each a few microseconds of a
mostly idle GPU. One launch per norm does the same arithmetic in the same order:
y = x * rsqrt(mean(x^2) + eps) in float32, cast to the input dtype, times the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch_options, prologue


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformers' RMSNorm (Llama, Mixtral, Qwen3-MoE, OLMoE, ...): the formula the kernel follows."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_reference(x, weight, eps) in one launch, over the last dimension of x."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        _rmsnorm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 4096 else 8, **pdl_launch_options(x.device),
        )
    return out.view(x.shape)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, N, eps, BLOCK: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / N
    y = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)
