"""The one-token decode attention kernel against SDPA over repeat_kv'd keys, and the attention
implementation that routes one-token queries to it.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest.py), in float32 and
float16 (the interpreter's bfloat16 dot is wrong); bfloat16 and torch.compile run on a GPU (`-m gpu`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import sdpa_attention

from hf_moe_accel.kernels.decode_attention import (
    decode_attention,
    decode_attention_op,
    decode_attention_supported,
    launch_plan,
)
from hf_moe_accel.patches import attention
from hf_moe_accel.patches.attention import (
    DECODE_ATTENTION,
    apply_decode_attention,
    decode_attention_forward,
    remove_decode_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Against an SDPA in float32 on the same (rounded) inputs: float16 and bfloat16 lose p's precision in p.v.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(batch, kv_heads, groups, keys, dim, dtype, mask_kind, seed, contiguous=False, device=DEVICE):
    """query as the model makes it ([B, 1, Hq, D] transposed), key/value as the first `keys` positions of
    a longer static cache (unless contiguous), and a left-padding mask that differs per batch row."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    query = torch.randn(batch, 1, heads, dim, generator=g).to(device, dtype).transpose(1, 2)
    cache_len = keys if contiguous else keys + 5
    key, value = (torch.randn(batch, kv_heads, cache_len, dim, generator=g).to(device, dtype)[:, :, :keys]
                  for _ in range(2))
    mask = None
    if mask_kind != "none":
        allowed = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        for row in range(batch):
            allowed[row, ..., : min(2 * row, keys - 1)] = False  # left padding; every row sees a key
        allowed = allowed.to(device)
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, float("-inf") if mask_kind == "float" else torch.finfo(dtype).min)
    return query, key, value, mask


def _sdpa(query, key, value, mask, scale):
    """SDPA in float32 over repeat_kv'd keys, cast back."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.float().repeat_interleave(groups, 1) for t in (key, value))
    mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return F.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=scale).to(query.dtype)


class _Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("keys", [1, 7, 100, 257])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_kernel_matches_sdpa(groups, keys, mask_kind, dtype):
    case = groups + keys + len(mask_kind)  # the remaining dimensions, varied across cases
    batch, dim, contiguous = (1, 3)[case % 2], (64, 128)[case // 2 % 2], case % 3 == 0
    kv_heads = 1 if groups == 8 else 2
    query, key, value, mask = _inputs(batch, kv_heads, groups, keys, dim, dtype, mask_kind, case, contiguous)
    out = decode_attention(query, key, value, mask, 0.2)
    assert out.shape == query.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(query, key, value, mask, 0.2), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_split_k_matches_sdpa(num_splits, mask_kind):
    """Flash-decoding splits (forced here; by default on a GPU, for small batches), with row 2's
    left padding (4 keys) and row 3's (>= 130 keys) covering whole splits."""
    query, key, value, mask = _inputs(4, 2, 4, 257, 64, torch.float32, mask_kind, num_splits)
    if mask is not None:
        mask[3, ..., :130] = False if mask.dtype == torch.bool else float("-inf")
    out = decode_attention(query, key, value, mask, 0.2, num_splits=num_splits)
    torch.testing.assert_close(out, _sdpa(query, key, value, mask, 0.2), **TOL[torch.float32])


@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_dot_and_broadcast_sum_paths(groups, use_dot):
    """Both ways of computing the scores and p.v (tensor-core dots by default)."""
    query, key, value, mask = _inputs(3, 2, groups, 70, 64, torch.float16, "bool", groups)
    out = decode_attention(query, key, value, mask, 0.2, use_dot=use_dot, num_splits=2)
    torch.testing.assert_close(out, _sdpa(query, key, value, mask, 0.2), **TOL[torch.float16])


def test_large_negative_float_mask_and_broadcast_batch():
    query, key, value, mask = _inputs(3, 2, 4, 40, 64, torch.float32, "min", 1)
    torch.testing.assert_close(decode_attention(query, key, value, mask, None),
                               _sdpa(query, key, value, mask, 64**-0.5), **TOL[torch.float32])
    shared = mask[:1]  # [1, 1, 1, K]: one mask for every row
    torch.testing.assert_close(decode_attention(query, key, value, shared, 0.3),
                               _sdpa(query, key, value, shared, 0.3), **TOL[torch.float32])


@pytest.mark.parametrize("batch, kv_heads, kv_len, dim, sms, splits, plan", [
    (1, 4, 256, 128, 132, None, (16, 16, 1)),  # qwen3-30b-a3b, batch 1: the fastest in the H200 sweep
    (1, 4, 1024, 128, 132, None, (16, 64, 1)),  # a 64-key tile a program already gives 64 programs
    (1, 16, 256, 128, 132, None, (4, 64, 1)),  # olmoe-1b-7b, batch 1
    (1, 16, 1024, 128, 132, None, (16, 64, 1)),
    (1, 4, 8192, 128, 132, None, (64, 64, 2)),  # long caches: at most _MAX_SPLITS pieces, loops inside
    (8, 4, 256, 128, 132, None, (4, 64, 1)),
    (32, 16, 256, 128, 132, None, (1, 64, 2)),  # programs enough without a split
    (1, 16, 512, 256, 132, None, (16, 32, 1)),  # wide heads: tiles of at most 32 keys
    (1, 4, 1, 128, 132, None, (1, 16, 1)),
    (1, 4, 256, 128, None, None, (1, 64, 2)),  # the interpreter: one piece
    (1, 4, 256, 128, None, 3, (3, 64, 2)),  # pieces given: the tile for them
])
def test_launch_plan(batch, kv_heads, kv_len, dim, sms, splits, plan):
    assert launch_plan(batch, kv_heads, kv_len, dim, sms, splits) == plan


@pytest.mark.parametrize("skip_masked_keys", [True, False])
@pytest.mark.parametrize("block_k, num_splits", [(16, 1), (16, 5), (32, 4)])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_keys_never_reach_the_output(mask_kind, block_k, num_splits, skip_masked_keys):
    """NaN in the keys and values the mask rules out (a static cache's unwritten tail, the left padding)
    leave the output as SDPA gives it without them, whether their loads are skipped or made."""
    query, key, value, mask = _inputs(3, 2, 4, 90, 64, torch.float32, mask_kind, block_k + num_splits)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    allowed[..., 60:] = False
    mask = allowed if mask_kind == "bool" else mask.masked_fill(~allowed, float("-inf"))
    poisoned_key, poisoned_value = key.clone(), value.clone()
    ruled_out = ~allowed[:, 0, 0, :]  # [B, K]
    poisoned_key.permute(0, 2, 1, 3)[ruled_out] = float("nan")
    poisoned_value.permute(0, 2, 1, 3)[ruled_out] = float("nan")
    out = decode_attention(query, poisoned_key, poisoned_value, mask, 0.2, block_k=block_k, num_splits=num_splits,
                           skip_masked_keys=skip_masked_keys)
    torch.testing.assert_close(out, _sdpa(query, key, value, mask, 0.2), **TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros(mask_kind, num_splits):
    """Documented: a row whose every key is masked (False or -inf) gets zeros (SDPA gives NaN); the others are unaffected."""
    query, key, value, mask = _inputs(3, 2, 2, 150, 64, torch.float32, mask_kind, 2)
    mask[1] = False if mask.dtype == torch.bool else float("-inf")
    out = decode_attention(query, key, value, mask, 0.2, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    torch.testing.assert_close(out[keep], _sdpa(query[keep], key[keep], value[keep], mask[keep], 0.2))


def test_unsupported_inputs_are_refused():
    query, key, value, mask = _inputs(2, 2, 2, 9, 64, torch.float32, "bool", 0)
    assert decode_attention_supported(query, key, value, mask)
    assert not decode_attention_supported(query[..., :48], key[..., :48], value[..., :48], mask)  # head dim 48
    assert not decode_attention_supported(query.expand(2, 4, 3, 64), key, value, mask)  # 3 query tokens
    assert not decode_attention_supported(query[:, :3], key, value, mask)  # 3 heads over 2 KV heads
    assert not decode_attention_supported(query.half(), key, value, mask)
    assert not decode_attention_supported(query, key, value, mask.expand(2, 4, 1, 9))  # a mask per head
    with pytest.raises(ValueError, match="unsupported"):
        decode_attention(query[..., :48], key[..., :48], value[..., :48], mask)


def test_custom_op_matches_and_traces_as_one_op():
    query, key, value, mask = _inputs(2, 2, 4, 33, 64, torch.float32, "bool", 3)
    expected = decode_attention(query, key, value, mask, 0.2)
    torch.testing.assert_close(decode_attention_op(query, key, value, mask, 0.2), expected)
    torch.library.opcheck(decode_attention_op, (query, key, value, mask, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda q, k, v, m: decode_attention_op(q, k, v, m, 0.2), backend="aot_eager",
                             fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(query, key, value, mask), expected)


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """Send one-token queries to the kernel on CPU tensors too (interpreter), and count its calls."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "DECODE_KERNEL", "always" if DEVICE == "cpu" else "cuda")
    monkeypatch.setattr(attention, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("groups", [1, 4])
def test_attention_function_routes_one_token_queries_to_the_kernel(kernel_everywhere, groups, mask_kind):
    dtype = torch.float32
    query, key, value, mask = _inputs(3, 2, groups, 37, 64, dtype, mask_kind, groups)
    module = _Attention(groups)
    ours, _ = decode_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert len(kernel_everywhere) == 1
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (3, 1, 2 * groups, 64) and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


def test_attention_function_keeps_sdpa_for_everything_else(kernel_everywhere, monkeypatch):
    module = _Attention(4)
    query, key, value, mask = _inputs(2, 2, 4, 20, 64, torch.float32, "bool", 5)
    prefill = query.expand(2, 8, 3, 64)  # three query tokens
    prefill_mask = mask.expand(2, 1, 3, 20)
    ours, _ = decode_attention_forward(module, prefill, key, value, prefill_mask, scaling=0.25)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, prefill, key, value, prefill_mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs)
    decode_attention_forward(module, query, key, value, mask, dropout=0.1)  # dropout
    decode_attention_forward(module, query[..., :48], key[..., :48], value[..., :48], mask)  # head dim 48
    decode_attention_forward(module, query, key, value, mask, s_aux=torch.zeros(8))  # only Transformers knows sinks
    assert not kernel_everywhere
    monkeypatch.setattr(attention, "DECODE_KERNEL", "cuda")
    on_cpu = query.cpu(), key.cpu(), value.cpu(), mask.cpu()
    ours, _ = decode_attention_forward(module, *on_cpu, scaling=0.25)  # CPU tensors: folded SDPA, today's path
    assert not kernel_everywhere
    torch.testing.assert_close(ours, sdpa_attention.sdpa_attention_forward(module, *on_cpu, scaling=0.25)[0])


def test_ungrouped_heads_keep_sdpa_where_the_kernel_was_slower(kernel_everywhere, monkeypatch):
    """Grouped heads take the kernel at any size; ungrouped ones only up to UNGROUPED_KERNEL_MAX_KEYS keys
    over the batch (beyond, SDPA was faster on the GPU)."""
    assert attention.kernel_is_faster(32, 32, 4, 4096) and attention.kernel_is_faster(2, 16, 16, 4096)
    assert not attention.kernel_is_faster(2, 16, 16, 4097)
    limit = 64  # small, for the interpreter
    monkeypatch.setattr(attention, "UNGROUPED_KERNEL_MAX_KEYS", limit)
    module = _Attention(1)
    query, key, value, mask = _inputs(2, 2, 1, limit // 2 + 1, 16, torch.float32, "bool", 7)
    ours, _ = decode_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert not kernel_everywhere
    torch.testing.assert_close(ours, sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)[0])
    decode_attention_forward(module, query[:1, :, :, :], key[:1, :, :limit], value[:1, :, :limit], mask[:1, ..., :limit])
    assert len(kernel_everywhere) == 1


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped, and not grouped
def test_apply_decode_attention_generates_like_stock(kernel_everywhere, kv_heads):
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, num_experts=4, num_experts_per_tok=2,
        vocab_size=128, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(DEVICE)
    ids = torch.randint(1, 128, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static",
                  return_dict_in_generate=True, output_logits=True, pad_token_id=0, disable_compile=True)
    stock = model.generate(ids, **kwargs)
    assert apply_decode_attention(model) and model.config._attn_implementation == DECODE_ATTENTION
    ours = model.generate(ids, **kwargs)
    assert len(kernel_everywhere) == 2 * 4  # 2 layers x 4 one-token steps
    remove_decode_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model.config._attn_implementation = "eager"
    assert not apply_decode_attention(model)  # only "sdpa" models are switched


@pytest.mark.gpu
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("heads, kv_heads, keys, batch", [
    (32, 4, 1, 1), (32, 4, 300, 1), (32, 4, 257, 3), (16, 16, 300, 2), (32, 4, 4100, 2), (16, 16, 3000, 1)])
def test_kernel_bfloat16_on_gpu(heads, kv_heads, keys, batch, mask_kind):
    groups = heads // kv_heads
    for dim in (64, 128):
        query, key, value, mask = _inputs(batch, kv_heads, groups, keys, dim, torch.bfloat16, mask_kind, keys)
        torch.testing.assert_close(decode_attention(query, key, value, mask, dim**-0.5),
                                   _sdpa(query, key, value, mask, dim**-0.5), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_attention_function_on_gpu_eager_compiled_and_graphed():
    """bf16 on CUDA: the attention function against Transformers' SDPA, eager, under torch.compile
    (inductor, the kernel an opaque op) and replayed from a CUDA graph."""
    module = _Attention(8)
    query, key, value, mask = _inputs(3, 4, 8, 300, 128, torch.bfloat16, "bool", 7)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=128**-0.5)
    eager, _ = decode_attention_forward(module, query, key, value, mask, scaling=128**-0.5)
    torch.testing.assert_close(eager, theirs, **TOL[torch.bfloat16])

    def step(q, k, v, m):
        return decode_attention_forward(module, q, k, v, m, scaling=128**-0.5)[0] * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(query, key, value, mask), eager * 2, rtol=0, atol=0)

    static = [t.clone() for t in (query, key, value, mask)]
    compiled(*static)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    query2, key2, value2, mask2 = _inputs(3, 4, 8, 300, 128, torch.bfloat16, "bool", 8)
    for buffer, new in zip(static, (query2, key2, value2, mask2)):
        buffer.copy_(new)
    graph.replay()
    expected, _ = sdpa_attention.sdpa_attention_forward(module, query2, key2, value2, mask2, scaling=128**-0.5)
    torch.testing.assert_close(out, expected * 2, **TOL[torch.bfloat16])
