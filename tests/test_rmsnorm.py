"""Fused RMSNorm: the kernel against its reference, and which modules get it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_accel import accelerate, patch_report, unpatch
from hf_moe_accel.kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton
from hf_moe_accel.patches.norms import follows_reference


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1, 256), (3, 5, 128), (7, 2048), (2, 1, 4, 100), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator).to(_device(), dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(_device(), dtype)
    torch.testing.assert_close(rmsnorm_triton(x, weight, 1e-6), rmsnorm_reference(x, weight, 1e-6))


def test_kernel_reads_strided_rows():
    x = torch.randn(4, 6, 128, device=_device(), dtype=torch.float16)[:, ::2]
    weight = torch.randn(128, device=_device(), dtype=torch.float16)
    torch.testing.assert_close(rmsnorm_triton(x, weight, 1e-5), rmsnorm_reference(x, weight, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [128, 2048, 4096, 2880])
def test_kernel_bfloat16_on_gpu(n):
    x = torch.randn(33, n, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ours, ref = rmsnorm_triton(x, weight, 1e-6), rmsnorm_reference(x, weight, 1e-6)
    # Same arithmetic; the float32 sum order differs, so at most an odd last-bit difference.
    torch.testing.assert_close(ours, ref, rtol=8e-3, atol=1e-2)
    assert (ours != ref).float().mean() < 0.01


class _GemmaStyleNorm(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.eps = 1e-6

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).type_as(x)


def test_only_the_reference_formula_is_taken():
    assert not follows_reference(_GemmaStyleNorm(64), 1e-6)


def test_accelerate_patches_norms_and_unpatch_restores_them():
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, vocab_size=128,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    classes = {name: type(m) for name, m in model.named_modules()}
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
        accelerate(model, cuda_graphs=False)
        # 2 layers x (input, post-attention, q, k) + the final norm
        assert len(patch_report(model).norms) == 9
        torch.testing.assert_close(model(ids).logits, before)
        unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
