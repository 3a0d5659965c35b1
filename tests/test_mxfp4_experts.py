"""MXFP4 gpt-oss experts (issue 31, part 4): Transformers' `Mxfp4GptOssExperts` served by our kernels.

Transformers builds these modules only where its hub kernels load (a GPU and the `kernels` package);
its forward runs the hub's matmul, which needs a GPU. The tests build the modules directly and fill
them through Transformers' own loader (`swizzle_mxfp4_convertops`) from random checkpoint-format
blocks and scales, with a stand-in for the hub's tensor and layout objects (`FakeHub`): its value
layout reverses the packed axis, so a read that skipped `unswizzle_data` would see wrong weights.
Stock's forward off the GPU is Transformers' other case: the checkpoint dequantized at load
(`convert_moe_packed_tensors`) into a bf16-layout `GptOssExperts`, run eagerly.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import GptOssConfig
from transformers.integrations import mxfp4 as tf_mxfp4
from transformers.models.gpt_oss import modeling_gpt_oss

from hf_moe_accel import UnsupportedMoEError, kernels
from hf_moe_accel.kernels import MxScales, experts_triton
from hf_moe_accel.kernels.experts_mxfp4_reference import (
    dequantize_mxfp4,
    experts_mxfp4_reference,
)
from hf_moe_accel.patches import registry
from hf_moe_accel.patches.mxfp4_experts import Mxfp4State
from hf_moe_accel.patches.swap import STATE_ATTR, is_swapped


class _Strided:
    def unswizzle_data(self, data: torch.Tensor) -> torch.Tensor:
        return data


class _Reversed:
    """A swizzled layout stand-in: the stored data has its last axis reversed."""

    def unswizzle_data(self, data: torch.Tensor) -> torch.Tensor:
        return data.flip(-1)


class _HubTensor:
    def __init__(self, data: torch.Tensor, layout: object):
        self.storage = SimpleNamespace(data=data, layout=layout)
        self.shape = data.shape


def _wrap(tensor, dtype=None):
    return _HubTensor(tensor, _Strided())


def _convert_layout(tensor, layout, **options):
    data = tensor.storage.data
    return _HubTensor(data.flip(-1).contiguous() if layout is _Reversed else data, layout())


FAKE_HUB = SimpleNamespace(
    matmul_ogs=SimpleNamespace(PrecisionConfig=lambda weight_scale, flex_ctx: SimpleNamespace(weight_scale=weight_scale),
                               FlexCtx=lambda rhs_data: None, InFlexData=lambda: None),
    tensor=SimpleNamespace(FP4="fp4", convert_layout=_convert_layout, wrap_torch_tensor=_wrap),
    tensor_details=SimpleNamespace(layout=SimpleNamespace(
        make_default_matmul_mxfp4_w_layout=lambda mx_axis: (_Reversed, {}), StridedLayout=_Strided)),
)


@pytest.fixture(autouse=True)
def fake_hub(monkeypatch):
    monkeypatch.setattr(tf_mxfp4, "triton_kernels_hub", FAKE_HUB, raising=False)


def _config(experts: int = 8, hidden: int = 64, inter: int = 96, top_k: int = 2) -> GptOssConfig:
    return GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, vocab_size=64)


def _random_checkpoint(config: GptOssConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """gpt-oss's checkpoint tensors: blocks [E, N, G, 16] uint8, scales [E, N, G] uint8, float32 biases.
    Scales near 127 keep the products in a range where float32 sums stay accurate."""
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    tensors = {}
    for proj, (n, k) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
        tensors[f"{proj}_blocks"] = torch.randint(0, 256, (e, n, k // 32, 16), generator=gen, dtype=torch.uint8)
        tensors[f"{proj}_scales"] = torch.randint(121, 126, (e, n, k // 32), generator=gen, dtype=torch.uint8)
        tensors[f"{proj}_bias"] = torch.randn(e, n, generator=gen)
    return tensors


def _mxfp4_block(config: GptOssConfig, checkpoint: dict[str, torch.Tensor]) -> tf_mxfp4.Mxfp4GptOssMLP:
    """An Mxfp4GptOssMLP filled the way Transformers loads a checkpoint with the hub kernels."""
    experts = tf_mxfp4.Mxfp4GptOssExperts(config)
    router = modeling_gpt_oss.GptOssTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(3))
    for proj in ("gate_up_proj", "down_proj"):
        tf_mxfp4.swizzle_mxfp4_convertops(checkpoint[f"{proj}_blocks"], checkpoint[f"{proj}_scales"], experts, proj,
                                          torch.device("cpu"), FAKE_HUB)
        getattr(experts, f"{proj}_bias").data.copy_(checkpoint[f"{proj}_bias"])
    return tf_mxfp4.Mxfp4GptOssMLP(router, experts)


def _dequantized_experts(config: GptOssConfig, checkpoint: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Transformers' dequantize-at-load case, float32: a GptOssExperts run eagerly."""
    config = GptOssConfig(**{**config.to_dict(), "dtype": "float32"})
    config._experts_implementation = "eager"
    experts = modeling_gpt_oss.GptOssExperts(config)
    for proj in ("gate_up_proj", "down_proj"):
        weight = tf_mxfp4.convert_moe_packed_tensors(checkpoint[f"{proj}_blocks"], checkpoint[f"{proj}_scales"],
                                                     dtype=torch.float32)
        getattr(experts, proj).data = weight
        getattr(experts, f"{proj}_bias").data = checkpoint[f"{proj}_bias"].clone()
    return experts


def _patch_block(block: torch.nn.Module) -> registry.PatchReport:
    model = torch.nn.Sequential()
    model.add_module("mlp", block)
    return registry.patch_model(model)


# ---------------------------------------------------------------------------------------------
# (1) dequantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 3), (2, 64, 1), (1, 7, 90)])  # (E, N, groups): odd counts included
def test_dequantize_bit_equal_to_transformers(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)  # every e8m0 byte, under/overflow included
    theirs = tf_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, N]
    ours = dequantize_mxfp4(blocks.reshape(*shape[:2], -1), scales, dtype)  # [E, N, K]
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    assert torch.equal(ours.transpose(1, 2).contiguous().view(bits), theirs.view(bits))  # NaN bits too


def test_dequantize_refuses_partial_groups():
    # The format has no partial group: one e8m0 scale per 32 values, a row is a whole number of groups.
    with pytest.raises(ValueError, match="16 \\* G"):
        dequantize_mxfp4(torch.zeros(2, 3, 10, dtype=torch.uint8), torch.zeros(2, 3, 1, dtype=torch.uint8), torch.float32)


# ---------------------------------------------------------------------------------------------
# (2) detection, patching, the reference path against Transformers' dequantized forward


def _routes(tokens: int, config: GptOssConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Top-k over the first E - 2 experts only: the last two get no token.
    scores = torch.rand(tokens, config.num_local_experts - 2, generator=gen)
    ids = scores.topk(config.num_experts_per_tok, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, config.num_experts_per_tok, generator=gen), dim=-1)
    return ids, weights


@pytest.mark.parametrize("tokens", [1, 3, 64, 200])
def test_reference_path_matches_dequantized_forward(tokens):
    config = _config()
    gen = torch.Generator().manual_seed(tokens)
    checkpoint = _random_checkpoint(config, gen)
    block = _mxfp4_block(config, checkpoint)
    report = _patch_block(block)
    assert report.mxfp4 == ["mlp.experts"] and report.experts == ["mlp.experts"]
    x = torch.randn(tokens, config.hidden_size, generator=gen)
    ids, weights = _routes(tokens, config, gen)
    ours = block.experts(x, ids, weights)
    stock = _dequantized_experts(config, checkpoint)(x, ids, weights)
    # float32 throughout; the two sum the same products in different orders (F.linear against a
    # row-at-a-time matmul), so they agree to float32 rounding of O(1e2)-sized dot products.
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-4)


def test_block_forward_routes_like_stock():
    config = _config()
    gen = torch.Generator().manual_seed(7)
    checkpoint = _random_checkpoint(config, gen)
    block = _mxfp4_block(config, checkpoint)
    x = torch.randn(2, 5, config.hidden_size, generator=gen)
    _patch_block(block)
    out, logits = block(x)
    flat = x.reshape(-1, config.hidden_size)
    stock_logits, scores, ids = modeling_gpt_oss.GptOssTopKRouter.forward(block.router, flat)
    expected = _dequantized_experts(config, checkpoint)(flat, ids, scores).reshape(2, 5, -1)
    torch.testing.assert_close(logits, stock_logits)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)  # as above


def test_unpatch_restores_stock():
    config = _config()
    checkpoint = _random_checkpoint(config, torch.Generator().manual_seed(1))
    block = _mxfp4_block(config, checkpoint)
    model = torch.nn.Sequential()
    model.add_module("mlp", block)
    registry.patch_model(model)
    assert is_swapped(block.experts) and is_swapped(block)
    assert isinstance(block.experts.__dict__[STATE_ATTR], Mxfp4State)
    registry.unpatch_model(model)
    assert type(block.experts) is tf_mxfp4.Mxfp4GptOssExperts and type(block) is tf_mxfp4.Mxfp4GptOssMLP
    assert STATE_ATTR not in block.experts.__dict__
    for proj in ("gate_up_proj", "down_proj"):
        weight = getattr(block.experts, proj)
        assert isinstance(weight.storage.layout, _Reversed)  # swizzled again by Transformers' loader
        blocks = weight.storage.layout.unswizzle_data(weight.storage.data).transpose(-1, -2)
        assert torch.equal(blocks.reshape(checkpoint[f"{proj}_blocks"].shape), checkpoint[f"{proj}_blocks"])
        scale = getattr(block.experts, f"{proj}_precision_config").weight_scale
        assert torch.equal(scale.storage.data.transpose(-1, -2), checkpoint[f"{proj}_scales"])


def test_unloaded_module_refused_before_any_change():
    config = _config()
    good = _mxfp4_block(config, _random_checkpoint(config, torch.Generator().manual_seed(2)))
    bad = tf_mxfp4.Mxfp4GptOssMLP(modeling_gpt_oss.GptOssTopKRouter(config), tf_mxfp4.Mxfp4GptOssExperts(config))
    model = torch.nn.Sequential()
    model.add_module("a", good)
    model.add_module("b", bad)
    with pytest.raises(UnsupportedMoEError, match="MXFP4"):
        registry.patch_model(model)
    assert not is_swapped(good.experts) and not is_swapped(good) and not is_swapped(bad.experts)


def test_size_not_multiple_of_group_refused():
    config = _config(hidden=48)  # 48 values: one and a half e8m0 groups
    experts = tf_mxfp4.Mxfp4GptOssExperts(config)
    model = torch.nn.Sequential()
    model.add_module("mlp", tf_mxfp4.Mxfp4GptOssMLP(modeling_gpt_oss.GptOssTopKRouter(config), experts))
    with pytest.raises(UnsupportedMoEError, match="multiple of 32"):
        registry.patch_model(model)


def test_dequantized_at_load_is_reported():
    config = _config()
    config.quantization_config = {"quant_method": "mxfp4", "dequantize": True}
    model = modeling_gpt_oss.GptOssModel(config)
    report = registry.patch_model(model)
    try:
        assert report.mxfp4_dequantized and not report.mxfp4 and report.experts
    finally:
        registry.unpatch_model(model)


# ---------------------------------------------------------------------------------------------
# (3) the Triton MXFP4 variant under Triton's interpreter, against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path,tokens", [("decode", 3), ("prefill", 20)])
def test_triton_mxfp4_matches_reference(dtype, path, tokens):
    config = _config(experts=4, hidden=64, inter=64)
    gen = torch.Generator().manual_seed(11)
    block = _mxfp4_block(config, _random_checkpoint(config, gen))
    _patch_block(block)
    weights = block.experts.__dict__[STATE_ATTR].weights
    x = torch.randn(tokens, config.hidden_size, generator=gen).to(dtype)
    ids, routing = _routes(tokens, config, gen)
    ids[0, 1] = -1  # "no expert"
    expected = experts_mxfp4_reference(x, weights, ids, routing)
    got = experts_triton.fused_experts_triton(x, weights, ids, routing, path=path)
    # float32: the same products summed in another order. float16: the intermediate is stored in
    # float16 by both, and sums of O(1e2) round at ~1e-1 there.
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-1}
    torch.testing.assert_close(got, expected, **tol)


def test_accelerate_whole_model_matches_dequantized_model():
    """A 2-layer gpt-oss whose MLPs are Transformers' MXFP4 blocks, accelerated, against the same model
    dequantized at load: logits and greedy tokens; unpatch gives the stock blocks back."""
    import hf_moe_accel

    config = _config(inter=64)
    config.num_hidden_layers, config.layer_types = 2, ["full_attention"] * 2
    torch.manual_seed(0)
    model = modeling_gpt_oss.GptOssForCausalLM(config).eval()
    stock = modeling_gpt_oss.GptOssForCausalLM(config).eval()
    stock.load_state_dict(model.state_dict())
    stock.config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    for layer, stock_layer in zip(model.model.layers, stock.model.layers):
        checkpoint = _random_checkpoint(config, gen)
        block = _mxfp4_block(config, checkpoint)
        block.router.load_state_dict(layer.mlp.router.state_dict())
        layer.mlp = block
        stock_layer.mlp.experts.load_state_dict(_dequantized_experts(config, checkpoint).state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=gen)
    with torch.no_grad():
        want = stock(ids).logits
        hf_moe_accel.accelerate(model)
        assert hf_moe_accel.patch_report(model).mxfp4 == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)  # float32, as above
        greedy = {"max_new_tokens": 4, "do_sample": False}
        assert torch.equal(model.generate(ids, **greedy), stock.generate(ids, **greedy))
    hf_moe_accel.unpatch(model)
    assert type(model.model.layers[0].mlp.experts) is tf_mxfp4.Mxfp4GptOssExperts
    with pytest.raises(ValueError, match="doesn't offload MXFP4 experts"):
        hf_moe_accel.accelerate(model, gpu_memory="1GiB")
    assert not hf_moe_accel.is_accelerated(model)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 64, 200])
def test_gpu_bf16_kernels_match_reference(tokens):
    """gpt-oss-20b's expert sizes (hidden 2880 = 90 groups, intermediate 2880) in bf16, on the GPU through
    `kernels.fused_experts` (the Triton MXFP4 path), against the reference in float32."""
    config = _config(experts=8, hidden=2880, inter=2880, top_k=4)
    gen = torch.Generator().manual_seed(tokens)
    block = _mxfp4_block(config, _random_checkpoint(config, gen))
    _patch_block(block)
    weights = block.experts.__dict__[STATE_ATTR].weights
    x = torch.randn(tokens, config.hidden_size, generator=gen)
    ids, routing = _routes(tokens, config, gen)
    cuda = {name: getattr(weights, name).cuda() for name in ("gate_up", "down", "gate_up_bias", "down_bias")}
    on_gpu = replace(weights, **cuda, mx_scales=MxScales(weights.mx_scales.gate_up.cuda(), weights.mx_scales.down.cuda()))
    assert kernels.mxfp4_kernels_serve(x.cuda().bfloat16(), on_gpu)
    got = kernels.fused_experts(x.cuda().bfloat16(), on_gpu, ids.cuda(), routing.cuda()).float().cpu()
    expected = experts_mxfp4_reference(x, weights, ids, routing)
    # bf16 activations and intermediate against float32 throughout: bf16's 8 mantissa bits over
    # 2880-term sums of O(1) products; relative to the output's scale.
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-2)
