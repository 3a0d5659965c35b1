"""Fused experts on block-scaled FP8 weights (Transformers' fine-grained FP8 layout) against references.

On CPU the Triton kernels run in Triton's interpreter, which decodes float8_e4m3fn loads exactly
(`test_interpreter_decodes_float8`), so the CPU tests run the true FP8 kernels; activations are float32
or float16 there (the interpreter's bf16 dots are wrong). Sizes are not multiples of the quantization
block (hidden 200, inter 72 in 128x128 blocks: partial blocks, and gate and up rows sharing a block),
and smaller blocks (some not a power of two) put several scale blocks inside one kernel tile. The
interpreter runs the decode path (one program per pair) up to `INTERPRETER_DECODE_TOKENS` tokens:
hundreds of pairs take minutes there. The GPU tests run both paths at 1, 3, 64 and 200 tokens.

Tolerances. Kernels against `experts_fp8_reference`: both read the same stored values and scales, so
only float rounding differs: the suite's float32 / float16 / bf16 tolerances (`TOLERANCE`).
Against Transformers' forward on weights it dequantized itself: the same, since only the rounding of
the dequantized weights differs (it rounds the scale to the compute dtype before multiplying).
Against Transformers' FP8 matmul (GPU): it also quantizes the activations to e4m3 per (token,
128-column group), 3 mantissa bits, which costs about 4% relative RMS over the two GEMMs (a float32
simulation of that rule against weight-only FP8); the test allows twice that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from hf_moe_accel.kernels import (
    BlockScales,
    ExpertAddresses,
    fused_experts,
    fused_experts_at,
    ops,
    tuning,
)
from hf_moe_accel.kernels.experts_fp8_reference import (
    FP8_DTYPE,
    FP8_MAX,
    check_block_scales,
    dequantize_blocks,
    dequantize_expert_weights,
    experts_fp8_reference,
    quantize_blocks,
    quantize_expert_weights,
)
from hf_moe_accel.kernels.experts_reference import experts_reference
from hf_moe_accel.kernels.experts_triton import fit_scale_blocks, fused_experts_triton
from hf_moe_accel.kernels.spec import ExpertWeights

from .test_kernel_experts import (
    DEVICE,
    TOLERANCE,
    Case,
    drop_pairs,
    make_routing,
    make_weights,
    rel_error,
)


@dataclass(frozen=True)
class Fp8Case(Case):
    hidden: int = 200
    inter: int = 72
    block: tuple[int, int] = (128, 128)  # (rows, cols) of a scale block over the stored weight
    storage: torch.dtype = FP8_DTYPE  # float16 holds every e4m3 value exactly: the stand-in storage


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _spread(weight: torch.Tensor, block: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """`weight` with each block scaled by a random power of two in 2^-3..2^3, so that neighbouring
    blocks get scales up to 64x apart and a kernel reading another block's scale fails."""
    rows, cols = weight.shape[-2:]
    factors = 2.0 ** torch.randint(-3, 4, (weight.shape[0], _cdiv(rows, block[0]), _cdiv(cols, block[1])), generator=generator)
    full = factors.repeat_interleave(block[0], dim=1)[:, :rows].repeat_interleave(block[1], dim=2)[:, :, :cols]
    return weight * full


def make_fp8_weights(case: Fp8Case, device: str = DEVICE) -> ExpertWeights:
    """The case's layout with block-quantized gate_up and down (stored as `case.storage`, float32
    scales), biases in the activations' dtype."""
    dense = make_weights(replace(case, dtype=torch.float32), device="cpu")
    g = torch.Generator().manual_seed(4)
    dense = replace(dense, gate_up=_spread(dense.gate_up, case.block, g), down=_spread(dense.down, case.block, g))
    quantized = quantize_expert_weights(dense, case.block)
    scales = quantized.scales
    return replace(
        quantized,
        gate_up=quantized.gate_up.to(device=device, dtype=case.storage),
        down=quantized.down.to(device=device, dtype=case.storage),
        gate_up_bias=None if dense.gate_up_bias is None else dense.gate_up_bias.to(device, case.dtype),
        down_bias=None if dense.down_bias is None else dense.down_bias.to(device, case.dtype),
        scales=BlockScales(scales.gate_up.to(device), scales.down.to(device), case.block),
    )


INTERPRETER_DECODE_TOKENS = 8


def paths_for(tokens: int) -> list[str]:
    """The paths a CPU test runs at this token count (both on a GPU)."""
    return ["decode", "prefill"] if DEVICE == "cuda" or tokens <= INTERPRETER_DECODE_TOKENS else ["prefill"]


def check_fp8(case: Fp8Case, path: str) -> None:
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
    ref = experts_fp8_reference(x, weights, ids, topk_weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < TOLERANCE[case.dtype], f"{case} {path}: rel error {rel_error(out, ref):.2e}"


# ---------------------------------------------------------------------------------------------
# The interpreter reads float8


def test_interpreter_decodes_float8() -> None:
    """Every finite e4m3 value loaded by a Triton kernel and widened to float32 is exact (on CPU under
    the interpreter, on a GPU natively): so the CPU tests below run true FP8 storage."""
    import triton
    import triton.language as tl

    @triton.jit
    def widen(src_ptr, dst_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs).to(tl.float32))

    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(DEVICE)
    out = torch.empty(256, device=DEVICE)
    widen[(1,)](values, out, BLOCK=256)
    finite = ~values.float().isnan()
    assert torch.equal(out[finite], values.float()[finite])


# ---------------------------------------------------------------------------------------------
# Kernels against the reference (interpreter on CPU)

FP8_CASES = [
    Fp8Case(tokens=1, top_k=1),
    Fp8Case(tokens=1, top_k=4, dtype=torch.float16),
    Fp8Case(tokens=3, top_k=2),
    Fp8Case(tokens=3, top_k=3, dtype=torch.float16, used_experts=4),  # half the experts get no token
    Fp8Case(tokens=8, top_k=4, used_experts=6),
    Fp8Case(tokens=64, top_k=2, used_experts=5),
    Fp8Case(tokens=64, top_k=4, dtype=torch.float16),
    Fp8Case(tokens=200, top_k=3, used_experts=6),
    Fp8Case(tokens=24, top_k=2, dtype=torch.float16, used_experts=3),  # several BLOCK_M blocks per expert
    # Blocks smaller than the kernel's tiles: several scale rows per tile, a row extent that is not a
    # power of two, and a K extent (16) under the interpreter's BLOCK_K (32), which must be cut.
    Fp8Case(tokens=5, top_k=2, block=(24, 32)),
    Fp8Case(tokens=5, top_k=3, block=(128, 16), dtype=torch.float16),
    # Other layouts: transposed (the block's rows run along K), interleaved GPT-OSS with biases, no gate.
    Fp8Case(tokens=5, top_k=2, transposed=True, block=(32, 48)),
    Fp8Case(tokens=3, top_k=2, transposed=True, interleaved=True, bias=True, act="swiglu_oai", limit=0.75, block=(64, 32)),
    Fp8Case(tokens=3, top_k=2, has_gate=False, act="relu2", block=(32, 32)),
]


def _case_id(case: Fp8Case) -> str:
    """The fields that differ from the defaults, for readable test ids."""
    default = Fp8Case(tokens=case.tokens, top_k=case.top_k)
    fields = [f"{name}={getattr(case, name)}" for name in case.__dataclass_fields__
              if name in ("tokens", "top_k") or getattr(case, name) != getattr(default, name)]
    return ",".join(fields).replace("torch.", "")


@pytest.mark.parametrize(
    "case, path", [(case, path) for case in FP8_CASES for path in paths_for(case.tokens)],
    ids=[f"{_case_id(case)}-{path}" for case in FP8_CASES for path in paths_for(case.tokens)],
)
def test_fp8_matches_reference(case: Fp8Case, path: str) -> None:
    check_fp8(case, path)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("case", [Fp8Case(tokens=3, top_k=2, block=(24, 32)), Fp8Case(tokens=4, top_k=2, dtype=torch.float16)],
                         ids=_case_id)
def test_storage_dtype_is_only_storage(case: Fp8Case, path: str) -> None:
    """The same stored values in float16 instead of float8 give bitwise the same output: the weight
    dtype only changes the loads (the dequantization math is the same code path)."""
    x, ids, topk_weights = make_routing(case)
    fp8 = fused_experts_triton(x, make_fp8_weights(case), ids, topk_weights, path=path)
    fp16 = fused_experts_triton(x, make_fp8_weights(replace(case, storage=torch.float16)), ids, topk_weights, path=path)
    assert torch.equal(fp8, fp16)


@pytest.mark.parametrize("split_k", [2, 3])
def test_prefill_split_k(split_k: int) -> None:
    """Down's K splits start on BLOCK_K multiples, so each split's tiles stay inside one scale block."""
    case = Fp8Case(tokens=5, top_k=2, block=(32, 32), bias=True)
    config = tuning.get_config("prefill", case.experts, case.inter, case.hidden, case.tokens, case.top_k, FP8_DTYPE, DEVICE)
    config = {**config, "down": {**config["down"], "SPLIT_K": split_k, "BLOCK_K": 16}}
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_triton(x, weights, ids, topk_weights, config=config)
    assert rel_error(out, experts_fp8_reference(x, weights, ids, topk_weights)) < TOLERANCE[case.dtype]


@pytest.mark.parametrize("pattern", ["some", "all"])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_no_expert_pairs(path: str, pattern: str) -> None:
    case = Fp8Case(tokens=6, top_k=3, block=(32, 32))
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    ids, topk_weights = drop_pairs(ids, topk_weights, pattern)
    out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
    assert not out.isnan().any()
    if pattern == "all":
        assert not out.any()
    else:
        assert rel_error(out, experts_fp8_reference(x, weights, ids, topk_weights)) < TOLERANCE[case.dtype]


@pytest.mark.parametrize("path", ["decode", "prefill", None])
def test_no_tokens(path: str | None) -> None:
    case = Fp8Case(tokens=0, top_k=2)
    x, ids, topk_weights = make_routing(case)
    out = fused_experts_triton(x, make_fp8_weights(case), ids, topk_weights, path=path)
    assert out.shape == (0, case.hidden) and out.dtype == x.dtype


def test_wrong_scales_would_be_caught() -> None:
    """The cases above detect a kernel that reads the wrong block's scale: reading the scale grid
    shifted by one block along either axis moves the output far past the tolerance."""
    case = Fp8Case(tokens=8, top_k=2)
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    ref = experts_fp8_reference(x, weights, ids, topk_weights)
    for dim in (1, 2):
        shifted = BlockScales(weights.scales.gate_up.roll(1, dim), weights.scales.down.roll(1, dim), case.block)
        wrong = experts_fp8_reference(x, replace(weights, scales=shifted), ids, topk_weights)
        assert rel_error(wrong, ref) > 100 * TOLERANCE[case.dtype]


# ---------------------------------------------------------------------------------------------
# The reference against Transformers


def _transformers_fp8():
    return pytest.importorskip("transformers.integrations.finegrained_fp8", reason="Transformers without fine-grained FP8")


def test_quantize_matches_transformers_quantizer() -> None:
    """`quantize_blocks` gives the bits Transformers' quantizer (`Fp8Quantize`) stores, where the sizes are
    multiples of the block (elsewhere Transformers leaves the tensor unquantized)."""
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config

    fp8 = _transformers_fp8()
    quantizer = fp8.Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128))))
    weight = torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(0))
    weight[0, :128, :128] = 0  # an all-zero block keeps scale 1
    theirs = quantizer._quantize_one("gate_up_proj", weight)
    stored, scale_inv = quantize_blocks(weight, (128, 128))
    assert torch.equal(stored.view(torch.uint8), theirs["gate_up_proj"].view(torch.uint8))
    assert torch.equal(scale_inv, theirs["gate_up_proj_scale_inv"])


@pytest.mark.parametrize("shape, block", [((2, 144, 200), (128, 128)), ((2, 200, 72), (128, 128)), ((2, 50, 70), (24, 32))])
def test_dequantize_matches_transformers(shape: tuple, block: tuple) -> None:
    """`dequantize_blocks` reads partial blocks as Transformers' own dequantization does."""
    fp8 = _transformers_fp8()
    if not hasattr(fp8, "_dequantize_fp8_weight"):
        pytest.skip("this Transformers has no _dequantize_fp8_weight (it came after 5.17)")
    stored, scale_inv = quantize_blocks(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), block)
    theirs = fp8._dequantize_fp8_weight(stored, scale_inv, list(block), torch.float32)
    assert torch.equal(dequantize_blocks(stored, scale_inv, block, torch.float32), theirs)


def test_quantization_error_bound() -> None:
    """Round trip within e4m3's rounding: half a step, 2^-4 relative for normals, 2^-10 x scale for subnormals."""
    weight = torch.randn(2, 200, 72, generator=torch.Generator().manual_seed(2))
    stored, scale_inv = quantize_blocks(weight, (128, 128))
    error = (dequantize_blocks(stored, scale_inv, (128, 128), torch.float32) - weight).abs()
    scale = dequantize_blocks(torch.ones_like(weight), scale_inv, (128, 128), torch.float32)
    assert (error <= weight.abs() * 2**-4 + scale * 2**-10 + 1e-12).all()
    assert (stored.float().abs().amax(dim=(1, 2)) == FP8_MAX).all()  # each block's absmax maps to 448


def _their_dequantization(fp8, weight: torch.Tensor, scale: torch.Tensor, block: list, dtype: torch.dtype) -> torch.Tensor:
    """Transformers' own dequantization where the version has it, else ours (equal to it in float32:
    test_dequantize_matches_transformers)."""
    dequantize = getattr(fp8, "_dequantize_fp8_weight", None)
    if dequantize is None:
        return dequantize_blocks(weight, scale, tuple(block), dtype)
    return dequantize(weight, scale, block, dtype)


def transformers_experts(weights: ExpertWeights, hidden: int, inter: int, num_experts: int, dtype: torch.dtype,
                         dequantized: bool):
    """Transformers' `FP8Experts` holding `weights`' stored FP8 tensors and scales, or (`dequantized`) the
    weights as Transformers' own dequantization turns them into `dtype` (its forward then runs F.linear)."""
    fp8 = _transformers_fp8()
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts, hidden_act="silu")
    block = list(weights.scales.block_size)
    with torch.device(weights.gate_up.device):
        module = fp8.FP8Experts(config, block_size=tuple(block)).eval()
    for name, weight, scale in (("gate_up_proj", weights.gate_up, weights.scales.gate_up),
                                ("down_proj", weights.down, weights.scales.down)):
        if dequantized:
            weight = _their_dequantization(fp8, weight, scale, block, dtype)
        setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))
        setattr(module, f"{name}_scale_inv", torch.nn.Parameter(scale.clone(), requires_grad=False))
    return module


@pytest.mark.parametrize("tokens, top_k", [(1, 1), (3, 2), (64, 4), (200, 3)])
def test_matches_transformers_dequantized_forward(tokens: int, top_k: int) -> None:
    """Transformers' FP8Experts forward on the weights it dequantizes itself, in float32, against the
    reference and both kernel paths."""
    case = Fp8Case(tokens=tokens, top_k=top_k, used_experts=6)
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    module = transformers_experts(weights, case.hidden, case.inter, case.experts, torch.float32, dequantized=True)
    with torch.no_grad():
        theirs = module(x, ids, topk_weights)
    assert rel_error(experts_fp8_reference(x, weights, ids, topk_weights), theirs) < TOLERANCE[torch.float32]
    for path in paths_for(tokens):
        out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
        assert rel_error(out, theirs) < TOLERANCE[torch.float32], path


# ---------------------------------------------------------------------------------------------
# Host side: checks, configs, dispatch


def test_block_scales_are_checked() -> None:
    weights = make_fp8_weights(Fp8Case(tokens=1, top_k=1))
    scales = weights.scales
    bad = {
        "float32 block scales only": replace(scales, gate_up=scales.gate_up.half()),
        "needs at least": replace(scales, down=scales.down[:, :1]),
        "same E": replace(scales, down=scales.down[:4]),
        "positive ints": replace(scales, block_size=(0, 128)),
    }
    for message, wrong in bad.items():
        with pytest.raises(ValueError, match=message):
            check_block_scales(replace(weights, scales=wrong))
    # Transformers allocates at least two row blocks for gate_up: extra grid rows are accepted and unread.
    padded = torch.cat([scales.gate_up, torch.full_like(scales.gate_up[:, :1], float("nan"))], dim=1)
    assert check_block_scales(replace(weights, scales=replace(scales, gate_up=padded))) is not None


def test_fit_scale_blocks() -> None:
    weights = make_fp8_weights(Fp8Case(tokens=1, top_k=1))
    config = {"path": "decode", "gate_up": {"BLOCK_N": 16, "BLOCK_K": 256}, "down": {"BLOCK_N": 16, "BLOCK_K": 64}}
    fitted = fit_scale_blocks(config, weights)
    assert fitted["gate_up"]["BLOCK_K"] == 128 and fitted["down"]["BLOCK_K"] == 64
    assert config["gate_up"]["BLOCK_K"] == 256  # the input (a cached config) is left as it is
    transposed = replace(weights, transposed=True, scales=replace(weights.scales, block_size=(32, 128)))
    assert fit_scale_blocks(config, transposed)["gate_up"]["BLOCK_K"] == 32  # K runs along the block's rows
    for block_k in (8, 100):  # largest power-of-two divisors 8 and 4: under tl.dot's 16
        with pytest.raises(ValueError, match="multiple of 16"):
            fit_scale_blocks(config, replace(weights, scales=replace(weights.scales, block_size=(128, block_k))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dispatch_and_custom_op(dtype: torch.dtype) -> None:
    """`fused_experts` and the custom op (eager and traced) serve FP8 weights: off the GPU through the reference."""
    case = Fp8Case(tokens=5, top_k=2, dtype=dtype)
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    ref = experts_fp8_reference(x, weights, ids, topk_weights)
    tolerance = 0.0 if DEVICE == "cpu" else TOLERANCE[dtype]
    assert rel_error(fused_experts(x, weights, ids, topk_weights), ref) <= tolerance
    assert rel_error(ops.fused_experts(x, weights, ids, topk_weights), ref) <= tolerance
    compiled = torch.compile(lambda *args: ops.fused_experts(*args), backend="aot_eager", fullgraph=True)
    assert rel_error(compiled(x, weights, ids, topk_weights), ref) <= tolerance


def test_dequantized_weights_give_the_reference() -> None:
    """`experts_fp8_reference` (experts hit only, ids remapped) equals `experts_reference` on every expert dequantized."""
    case = Fp8Case(tokens=7, top_k=3, used_experts=5, bias=True)
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    ids, topk_weights = drop_pairs(ids, topk_weights, "some")
    dense = dequantize_expert_weights(weights, case.dtype)
    assert torch.allclose(experts_fp8_reference(x, weights, ids, topk_weights),
                          experts_reference(x, dense, ids, topk_weights), rtol=1e-6, atol=1e-6)


def test_experts_by_address_refuse_fp8() -> None:
    weights = make_fp8_weights(Fp8Case(tokens=1, top_k=1))
    x, ids, topk_weights = make_routing(Fp8Case(tokens=1, top_k=1))
    addresses = ExpertAddresses(torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="block-scaled"):
        fused_experts_at(x, weights, addresses, ids, topk_weights)


@pytest.fixture
def tuned_bf16_only(monkeypatch: pytest.MonkeyPatch):
    """Tuned data for one shape: bf16 rows, and FP8 rows for top-k 8 only on another shape."""
    small = {"gate_up": {"BLOCK_N": 16}, "down": {"BLOCK_N": 16}}
    fp8 = {"gate_up": {"BLOCK_N": 32}, "down": {"BLOCK_N": 32}}
    data = {
        tuning.shape_key(128, 768, 2048, 8, torch.bfloat16): {"decode_max_tokens": 4, "decode": {"1": small}},
        tuning.shape_key(64, 768, 2048, 8, torch.bfloat16): {"decode_max_tokens": 4, "decode": {"1": small}},
        tuning.shape_key(64, 768, 2048, 8, FP8_DTYPE): {"decode_max_tokens": 2, "decode": {"1": fp8}},
    }
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "device_config_file", lambda device: "a GPU's file")
    monkeypatch.setattr(tuning, "load_config_file", lambda file: data)
    tuning._tuned.cache_clear()
    tuning.get_config.cache_clear()
    yield
    tuning._tuned.cache_clear()
    tuning.get_config.cache_clear()


def test_fp8_borrows_the_bf16_entry_unless_it_has_its_own(tuned_bf16_only) -> None:
    args = (768, 2048)
    # Only bf16 rows for this shape: FP8 takes them.
    assert tuning.use_decode_path(128, *args, 4, 8, FP8_DTYPE, "cuda") is True
    assert tuning.use_decode_path(128, *args, 5, 8, FP8_DTYPE, "cuda") is False
    assert tuning.get_config("decode", 128, *args, 1, 8, FP8_DTYPE, "cuda")["gate_up"]["BLOCK_N"] == 16
    # Its own rows win over the bf16 ones.
    assert tuning.use_decode_path(64, *args, 3, 8, FP8_DTYPE, "cuda") is False
    assert tuning.get_config("decode", 64, *args, 1, 8, FP8_DTYPE, "cuda")["gate_up"]["BLOCK_N"] == 32
    assert tuning.get_config("decode", 64, *args, 1, 8, torch.bfloat16, "cuda")["gate_up"]["BLOCK_N"] == 16


# ---------------------------------------------------------------------------------------------
# GPU: real float8_e4m3fn, bf16 activations

GPU_SHAPES = {
    "odd": dict(experts=16, hidden=200, inter=72),  # partial blocks along both axes
    "blocks": dict(experts=32, hidden=512, inter=384),  # multiples of 128, as Transformers' quantizer needs
}
GPU_TOKENS = [(1, 1), (3, 2), (64, 3), (200, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("tokens, top_k", GPU_TOKENS)
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_fp8_on_gpu(shape: str, tokens: int, top_k: int, path: str) -> None:
    check_fp8(Fp8Case(tokens=tokens, top_k=top_k, dtype=torch.bfloat16, used_experts=12, **GPU_SHAPES[shape]), path)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("pattern", ["some", "all"])
def test_no_expert_pairs_fp8_on_gpu(path: str, pattern: str) -> None:
    case = Fp8Case(tokens=33, top_k=4, dtype=torch.bfloat16, **GPU_SHAPES["blocks"])
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    ids, topk_weights = drop_pairs(ids, topk_weights, pattern)
    out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
    assert not out.isnan().any()
    ref = experts_fp8_reference(x, weights, ids, topk_weights)
    assert (not out.any()) if pattern == "all" else rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", GPU_TOKENS)
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_fp8_against_transformers_dequantized_on_gpu(shape: str, tokens: int, top_k: int) -> None:
    """Our dispatch (`fused_experts`: the Triton kernels here) against Transformers' FP8Experts forward on
    the same stored weights, dequantized by Transformers to bf16."""
    case = Fp8Case(tokens=tokens, top_k=top_k, dtype=torch.bfloat16, **GPU_SHAPES[shape])
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    module = transformers_experts(weights, case.hidden, case.inter, case.experts, torch.bfloat16, dequantized=True)
    with torch.no_grad():
        theirs = module(x, ids, topk_weights)
    out = fused_experts(x, weights, ids, topk_weights)
    assert torch.equal(out, fused_experts_triton(x, weights, ids, topk_weights))  # the dispatch ran the kernels
    assert rel_error(out, theirs) < TOLERANCE[torch.bfloat16]


def _transformers_fp8_matmul_reason() -> str | None:
    """Why Transformers' FP8 matmul can't run here (it needs DeepGEMM or the hub's finegrained-fp8
    kernel, which is downloaded on first use), or None where it can."""
    fp8 = _transformers_fp8()
    from transformers.integrations.deepgemm import is_deepgemm_loadable

    if is_deepgemm_loadable():
        return None
    try:
        fp8.load_finegrained_fp8_kernel()
    except Exception as error:  # ImportError, or the hub download failing offline
        return f"Transformers' FP8 matmul is unavailable (no DeepGEMM, finegrained-fp8 kernel: {error})"[:300]
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", GPU_TOKENS)
def test_fp8_against_transformers_fp8_forward(tokens: int, top_k: int) -> None:
    """Against Transformers' own FP8Experts forward on its FP8 path, which also quantizes activations per
    (token, 128 columns): relative RMS within 8% and max error within 10% of the output's max (module doc).
    Block-multiple sizes only: Transformers quantizes nothing else, so its kernels need not take them."""
    reason = _transformers_fp8_matmul_reason()
    if reason:
        pytest.skip(reason)
    case = Fp8Case(tokens=tokens, top_k=top_k, dtype=torch.bfloat16, **GPU_SHAPES["blocks"])
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    module = transformers_experts(weights, case.hidden, case.inter, case.experts, torch.bfloat16, dequantized=False)
    with torch.no_grad():
        theirs = module(x, ids, topk_weights).float()
    out = fused_experts(x, weights, ids, topk_weights).float()
    rms = ((out - theirs).pow(2).mean().sqrt() / theirs.pow(2).mean().sqrt()).item()
    assert rms < 0.08 and rel_error(out, theirs) < 0.10, f"rms {rms:.3f}, max {rel_error(out, theirs):.3f}"


@pytest.mark.gpu
def test_fp8_cuda_graph_capture() -> None:
    case = Fp8Case(tokens=16, top_k=4, dtype=torch.bfloat16, **GPU_SHAPES["blocks"])
    weights = make_fp8_weights(case)
    x, ids, topk_weights = make_routing(case)
    for path in ("decode", "prefill"):
        fused_experts_triton(x, weights, ids, topk_weights, path=path)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts_triton(x, weights, ids, topk_weights, path=path)
        _, new_ids, new_weights = make_routing(case, seed=5)
        ids.copy_(new_ids)
        topk_weights.copy_(new_weights)
        graph.replay()
        assert rel_error(out, experts_fp8_reference(x, weights, ids, topk_weights)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_fp8_real_shape_default_configs() -> None:
    """qwen3-30b-a3b's expert shape through the default configs (tuned bf16 rows borrowed, or the
    heuristic, with BLOCK_K cut to the 128 block), both paths, 1 and 64 tokens."""
    for tokens in (1, 64):
        case = Fp8Case(tokens=tokens, top_k=8, experts=128, hidden=2048, inter=768, dtype=torch.bfloat16)
        for path in ("decode", "prefill"):
            check_fp8(case, path)
