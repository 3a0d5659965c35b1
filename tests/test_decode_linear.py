"""One-launch decode linears: the kernel against F.linear, and the attention projections that use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe_accel import accelerate, patch_report, unpatch
from hf_moe_accel.kernels import decode_linear, ops
from hf_moe_accel.kernels.decode_linear import (
    DECODE_MAX_ROWS,
    decode_linears_fit,
    decode_linears_reference,
    decode_linears_triton,
)
from hf_moe_accel.patches.swap import is_swapped


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _linears(sizes, hidden, dtype, bias, generator, device=None):
    device = device or _device()
    weights = [(torch.randn(n, hidden, generator=generator) / hidden**0.5).to(device, dtype) for n in sizes]
    biases = [torch.randn(n, generator=generator).to(device, dtype) if bias else None for n in sizes]
    return weights, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("sizes", [(40, 8, 8), (33,), (7, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_f_linear(dtype, rows, sizes, bias):
    """Sizes off the block sizes (N not a multiple of BLOCK_N, K = 100 not one of BLOCK_K), 1 to 3 linears."""
    generator = torch.Generator().manual_seed(rows * 31 + len(sizes))
    x = torch.randn(rows, 1, 100, generator=generator).to(_device(), dtype)
    weights, biases = _linears(sizes, 100, dtype, bias, generator)
    assert decode_linears_fit(x, weights, biases)
    got = decode_linears_triton(x, weights, biases)
    for out, ref in zip(got, decode_linears_reference(x, weights, biases)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("block_k", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_over_several_k_tiles(block_k, rows):
    """K = 100 over 4, 2 and 1 tiles (the first loaded before the PDL wait, the rest in the loop), the last partial."""
    generator = torch.Generator().manual_seed(block_k + rows)
    x = torch.randn(rows, 100, generator=generator).to(_device(), torch.float32)
    weights, biases = _linears((40, 8, 8), 100, torch.float32, True, generator)
    config = {"BLOCK_N": 8, "BLOCK_K": block_k, "num_warps": 4}
    for out, ref in zip(decode_linears_triton(x, weights, biases, config=config), decode_linears_reference(x, weights, biases)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_reads_strided_weights_and_inputs():
    """Weight rows with a row stride wider than K (a column slice, as tensor parallelism leaves o_proj) and
    input rows with a stride."""
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(24, 700, generator=generator).to(_device(), torch.float32)
    weight = wide[:, 100:400]
    x = torch.randn(2, 600, generator=generator).to(_device(), torch.float32)[:, ::2]
    got = decode_linears_triton(x, [weight], [None])[0]
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_what_the_kernel_does_not_take():
    generator = torch.Generator().manual_seed(0)
    weights, biases = _linears((8, 8), 16, torch.float32, True, generator, "cpu")
    x = torch.randn(1, 16)
    assert decode_linears_fit(x, weights, biases)
    assert not decode_linears_fit(torch.randn(DECODE_MAX_ROWS + 1, 16), weights, biases)  # a GEMM's job
    assert not decode_linears_fit(x, weights, [biases[0], None])  # a bias on some linears only
    assert not decode_linears_fit(x, [weights[0], weights[1].half()], biases)
    assert not decode_linears_fit(x, [weights[0].t().contiguous().t()], [None])  # K not contiguous
    assert not decode_linears_fit(x, weights * 2, biases * 2)  # more than three


TINY = {
    "qwen3_moe": dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=8),
}


def _tiny(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, vocab_size=128, **TINY[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture
def launches(monkeypatch) -> list[int]:
    """The kernel's launches through the projections and routers, as the number of linears in each."""
    counts = []
    real = decode_linear.decode_linears_triton

    def counted(x, weights, biases, out_dtype=None, config=None):
        counts.append(len(weights))
        return real(x, weights, biases, out_dtype, config)

    monkeypatch.setattr(ops, "decode_linears_triton", counted)
    return counts


@pytest.fixture
def served_on_cpu(monkeypatch, launches) -> list[int]:
    """The projections' kernel on CPU tensors (Triton's interpreter), its launches counted."""
    monkeypatch.setattr(decode_linear, "SERVE_CPU_TENSORS", True)
    return launches


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_decode_steps_project_in_one_launch_and_match_stock(model_type, served_on_cpu):
    """Per layer at a decode step: q/k/v in one launch, o_proj in one (served: the interpreter's default
    config stands in for tuned data), the router in one (gpt-oss: with biases); logits equal stock's; the
    prompt's step (8 tokens) keeps stock's forward; unpatch restores every projection."""
    stock, model = _tiny(model_type), _tiny(model_type)
    accelerate(model, cuda_graphs=False)
    assert len(patch_report(model).projections) == 2
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        prompt_ours = model(ids[:, :8], use_cache=True)
        assert served_on_cpu == []  # 8 rows: stock
        prompt_stock = stock(ids[:, :8], use_cache=True)
        step_ours = model(ids[:, 8:], past_key_values=prompt_ours.past_key_values).logits
        step_stock = stock(ids[:, 8:], past_key_values=prompt_stock.past_key_values).logits
    assert served_on_cpu == [3, 1, 1] * 2
    torch.testing.assert_close(step_ours, step_stock, rtol=1e-4, atol=1e-4)
    unpatch(model)
    assert not any(is_swapped(m) for m in model.modules())


def test_a_follower_given_another_input_computes_its_own(served_on_cpu):
    model = _tiny("qwen3_moe")
    accelerate(model, cuda_graphs=False)
    attention = model.model.layers[0].self_attn
    x, other = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        attention.q_proj(x)
        torch.testing.assert_close(attention.k_proj(other), F.linear(other, attention.k_proj.weight))
        torch.testing.assert_close(attention.v_proj(x), F.linear(x, attention.v_proj.weight), rtol=1e-5, atol=1e-5)
        # A later layer-call's q_proj starts afresh; k_proj's unclaimed output is gone with it.
        attention.q_proj(other)
        torch.testing.assert_close(attention.k_proj(other), F.linear(other, attention.k_proj.weight), rtol=1e-5, atol=1e-5)
    assert served_on_cpu == [3, 1, 3]


def test_o_proj_without_tuned_data_keeps_cublas(monkeypatch, launches):
    """On CUDA o_proj takes the kernel only where the device's data has its shape: here none has, so a
    decode step launches q/k/v and the router only, and o_proj's output is F.linear's."""
    monkeypatch.setattr(decode_linear, "SERVE_CPU_TENSORS", True)
    monkeypatch.setattr(decode_linear, "decode_linear_config",
                        lambda sizes, K, rows, device: None if len(sizes) == 1 and sizes[0] == 64 else decode_linear.DEFAULT_CONFIG)
    model = _tiny("qwen3_moe")
    accelerate(model, cuda_graphs=False)
    o_proj = model.model.layers[0].self_attn.o_proj
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(o_proj(x), F.linear(x, o_proj.weight))
        model(torch.randint(0, 128, (1, 1)))
    assert launches == [3, 1] * 2  # the routers (4 experts: N=4) have "data"; o_proj (N=64) none


def test_training_and_gradients_keep_stock(served_on_cpu):
    model = _tiny("olmoe")
    accelerate(model, cuda_graphs=False)
    ids = torch.randint(0, 128, (1, 1))
    model(ids).logits.sum().backward()  # grad enabled, weights requiring grad: stock, differentiable
    assert served_on_cpu == []
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_compiled_decode_step_uses_the_opaque_op(served_on_cpu):
    """Under torch.compile the projections trace to the custom op (one per launch), same logits as eager."""
    model = _tiny("qwen3_moe")
    accelerate(model, cuda_graphs=False)
    ids = torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        eager = model(ids).logits
        served_on_cpu.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)(ids).logits
    assert served_on_cpu == [3, 1, 1] * 2
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes,hidden", [((4096, 512, 512), 2048), ((2048,), 4096), ((2048, 2048, 2048), 2048), ((128,), 2048)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_kernel_bfloat16_on_gpu(sizes, hidden, rows):
    """Real projection shapes (qwen3-30b-a3b's q/k/v and o, olmoe's q/k/v, a router) in bf16 against float32 math."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=generator).to("cuda", torch.bfloat16)
    weights, biases = _linears(sizes, hidden, torch.bfloat16, True, generator, "cuda")
    for out, ref in zip(decode_linears_triton(x, weights, biases),
                        decode_linears_reference(x.float(), [w.float() for w in weights], [b.float() for b in biases])):
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision", ["input", "float32", "upcast", "weight"])
def test_router_logits_at_each_precision(precision, served_on_cpu):
    """The router's linear through the launch keeps the stock precision's dtype and values (float16 inputs)."""
    from hf_moe_accel.patches.router import router_logits

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, generator=generator).half()
    weight, bias = torch.randn(8, 64, generator=generator).half(), torch.randn(8, generator=generator).half()
    with torch.no_grad():
        ours = router_logits(x, weight, bias, precision)
    assert served_on_cpu == [1]
    expected = {"float32": F.linear(x.float(), weight.float(), bias.float()),
                "upcast": F.linear(x.float(), weight.float(), bias.float()).half().float()}.get(precision)
    if expected is None:
        expected = F.linear(x.float(), weight.float(), bias.float()).half()
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("model_type", sorted(TINY))
def test_decode_step_on_gpu_matches_stock(model_type, monkeypatch, launches):
    """bf16 on CUDA: a decode step's logits through the launches against stock's (same weights), and the
    launches really ran (q/k/v, o and router per layer; the tiny shapes have no tuned data: the default config)."""
    monkeypatch.setattr(decode_linear, "decode_linear_config", lambda *args: decode_linear.DEFAULT_CONFIG)
    stock, model = _tiny(model_type).to("cuda", torch.bfloat16), _tiny(model_type).to("cuda", torch.bfloat16)
    accelerate(model, cuda_graphs=False)
    ids = torch.randint(0, 128, (1, 9), device="cuda")
    with torch.no_grad():
        prompt_ours, prompt_stock = model(ids[:, :8], use_cache=True), stock(ids[:, :8], use_cache=True)
        assert launches == []  # 8 rows: stock
        step_ours = model(ids[:, 8:], past_key_values=prompt_ours.past_key_values).logits.float()
        step_stock = stock(ids[:, 8:], past_key_values=prompt_stock.past_key_values).logits.float()
    assert launches == [3, 1, 1] * 2
    assert (step_ours - step_stock).abs().max() <= 0.05 * step_stock.abs().max()


def test_tuned_data_decides_where_the_kernel_runs(monkeypatch, tmp_path):
    """On CUDA the kernel runs only for shapes and row counts the device's data has a config for: a null
    entry (cuBLAS measured faster), a shape absent, or more rows than any tuned count keep F.linear."""
    import json

    file = tmp_path / "GPU.json"
    file.write_text(json.dumps({"decode_linear": {"N=64+8+8,K=32": {"1": {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4},
                                                                     "2": None}}}))
    monkeypatch.setattr(decode_linear, "interpreting", lambda: False)
    monkeypatch.setattr(decode_linear, "device_config_file", lambda device: file)
    decode_linear._tuned_config.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert decode_linear.decode_linear_config((64, 8, 8), 32, 1, cuda) == {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4}
        assert decode_linear.decode_linear_config((64, 8, 8), 32, 2, cuda) is None
        assert decode_linear.decode_linear_config((64, 8, 8), 32, 3, cuda) is None  # past the tuned counts
        assert decode_linear.decode_linear_config((64, 8), 32, 1, cuda) is None  # no data for this shape
    finally:
        decode_linear._tuned_config.cache_clear()
