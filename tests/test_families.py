"""Every family adapter against the stock Transformers model, on tiny random models (CPU, float32).

For each model type in ADAPTERS, a tiny model is built from a config in code with random weights
(router weights, biases and correction biases included), then `accelerate` must give the same
logits, the same greedy generation and the same router logits as the stock model, fuse the router
where the adapter says so, and `unpatch` must restore every class and tensor. A new adapter without
a case here fails `test_every_adapter_has_a_case`; a new decorated family in a new Transformers
fails `test_every_decorated_family_is_decided` until it gets an adapter or an UNSUPPORTED entry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import hf_moe_accel
from hf_moe_accel import UnsupportedMoEError, accelerate, patch_report, unpatch
from hf_moe_accel.kernels.spec import is_experts_module
from hf_moe_accel.patches.experts import EXPERTS_IMPLEMENTATION
from hf_moe_accel.patches.families import ADAPTERS
from hf_moe_accel.patches.registry import ADAPTER_BY_MODEL_TYPE

try:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
except ImportError:  # pragma: no cover
    CONFIG_MAPPING = transformers.CONFIG_MAPPING

# Decorated families (model folders of transformers) left out of ADAPTERS on purpose: the registry
# raises UnsupportedMoEError for them. Keep docs/ADAPTERS.md in step.
UNSUPPORTED: dict[str, str] = {
    "inkling2": "experts `_apply_gate` is a softcapped SwiGLU, not an Activation kind",
    "inkling2_loop": "Inkling2's experts (a softcapped SwiGLU `_apply_gate`, not an Activation kind) in looped layers",
    "muse_spark": "has_post_expert_norm=True: a norm after each expert, which the kernels don't compute",
    "ergo": "its experts module applies a per-expert RMSNorm to each route's output around the decorated projections",
}

GENERIC_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# DeepSeek-V3-style grouped routing: 16 experts in 4 groups, 2 groups eligible, top-3.
GROUPED = dict(n_routed_experts=16, num_local_experts=16, num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
# Hybrid models: one linear-attention layer and one attention layer, both MoE.
HYBRID = {"layer_types": ["linear_attention", "full_attention"], "mlp_layer_types": ["sparse", "sparse"]}
# Small gated-delta-net heads for the linear-attention layers of Qwen3.5-style hybrids (Lara-Mini).
HYBRID_SMALL = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)


@dataclass(frozen=True)
class Case:
    """How to build a tiny model whose experts have config.model_type == model_type."""

    model_type: str
    family: str  # the transformers/models/ folder
    config: dict[str, Any] = field(default_factory=dict)
    model_class: str | Callable[[Any], nn.Module] | None = None  # a class name, a builder, or AutoModelForCausalLM
    fused_router: Callable[[nn.Module], bool] | bool = True  # whether the registry must fuse the router
    inputs_embeds: bool = False  # the model takes embeddings, not token ids (Qwen3-Omni's talker)
    id: str = ""

    @property
    def name(self) -> str:
        return self.id or self.model_type


class BlockStack(nn.Module):
    """Two MoE blocks in a row, for experts that only live in a multimodal encoder."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, inputs_embeds: torch.Tensor) -> transformers.utils.ModelOutput:
        hidden_states = inputs_embeds
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states)
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden_states)


def _dots3_vision_moe_stack(config) -> nn.Module:
    from transformers.models.dots3_note import modeling_dots3_note

    return BlockStack([modeling_dots3_note.Dots3NoteVisionMoE(config, layer) for layer in range(2)])


CASES: tuple[Case, ...] = (
    Case("mixtral", "mixtral"),
    Case("minimax", "minimax", {"layer_types": ["full_attention", "full_attention"]}),
    Case("qwen2_moe", "qwen2_moe", {"shared_expert_intermediate_size": 48}),
    Case("qwen3_moe", "qwen3_moe"),
    Case("qwen3_moe", "qwen3_moe", {"norm_topk_prob": False}, id="qwen3_moe-no-renorm"),
    Case("qwen3_next", "qwen3_next", {"layer_types": ["linear_attention", "full_attention"]}),
    Case(
        "qwen4_exp_text",
        "qwen4_exp",
        {
            "layer_types": ["linear_attention", "full_attention"],
            # full-attention layers are token-indexed (QSA) and need an indexer
            **dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4),
        },
    ),
    Case("qwen3_5_moe_text", "qwen3_5_moe", {"layer_types": ["linear_attention", "full_attention"]}),
    Case("qwen3_vl_moe_text", "qwen3_vl_moe", model_class="Qwen3VLMoeTextModel"),
    Case("qwen3_omni_moe_text", "qwen3_omni_moe", model_class="Qwen3OmniMoeThinkerTextModel"),
    Case(
        "qwen3_omni_moe_talker_text",
        "qwen3_omni_moe",
        {"shared_expert_intermediate_size": 32},
        model_class="Qwen3OmniMoeTalkerModel",
        inputs_embeds=True,
    ),
    Case("olmoe", "olmoe"),
    Case("flex_olmo", "flex_olmo"),
    Case("mellum", "mellum"),
    Case("lara_mini", "lara_mini", {**HYBRID_SMALL, "layer_types": ["linear_attention", "sliding_attention", "full_attention"],
         "num_hidden_layers": 3}),
    Case("lara_mini", "lara_mini", {**HYBRID_SMALL, "norm_topk_prob": False}, id="lara_mini-no-renorm"),
    Case("jamba", "jamba", {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0, "mamba_dt_rank": 8},
         fused_router=lambda router: not isinstance(router, nn.Linear)),  # 5.17: a plain Linear router
    Case("hunyuan_v1_moe", "hunyuan_v1_moe"),
    Case("ernie4_5_moe", "ernie4_5_moe", {"moe_layer_start_index": 0, "moe_layer_interval": 1}),
    Case(
        "ernie4_5_vl_moe_text",
        "ernie4_5_vl_moe",
        {
            "moe_intermediate_size": [32, 16],
            "moe_k": 2,
            "mlp_layer_types": ["sparse", "sparse"],
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [3, 3, 2]},
        },
        model_class="Ernie4_5_VLMoeTextModel",
    ),
    # Zero (identity) experts beside the routed ones: the block routes them around the experts.
    Case("longcat_flash", "longcat_flash", {"zero_expert_num": 4, "num_layers": 2}),
    # config.router_bias: a classifier bias the stock router never adds; the router stays stock.
    Case("longcat_flash", "longcat_flash", {"zero_expert_num": 4, "num_layers": 2, "router_bias": True}, fused_router=False,
         id="longcat_flash-router-bias"),
    Case("deepseek_v2", "deepseek_v2", {"topk_method": "greedy"}),
    Case("deepseek_v2", "deepseek_v2", {**GROUPED, "topk_method": "group_limited_greedy"}, id="deepseek_v2-grouped"),
    Case("deepseek_ocr2_text", "deepseek_ocr2", {"topk_method": "greedy", "mlp_layer_types": ["sparse", "sparse"]}, model_class="DeepseekOcr2TextModel"),
    Case(
        "unlimited_ocr_text",
        "unlimited_ocr",
        {**GROUPED, "topk_method": "group_limited_greedy", "mlp_layer_types": ["sparse", "sparse"]},
        model_class="UnlimitedOcrTextModel",
    ),
    Case("mistral4", "mistral4", {**GROUPED, "head_dim": 16}, model_class="Mistral4ForCausalLM"),
    Case("mistral_large4_text", "mistral_large4", GROUPED, model_class="MistralLarge4TextModel"),
    # Sparse attention picking 4 of the 9 keys (index_topk): its code tests the attention name against "sdpa".
    Case("mistral_large4_text", "mistral_large4", {**GROUPED, "index_topk": 4}, model_class="MistralLarge4TextModel",
         id="mistral_large4_text-sparse"),
    Case("gpt_oss", "gpt_oss"),
    Case("openai_privacy_filter", "openai_privacy_filter", {"num_experts_per_tok": 4}, model_class="OpenAIPrivacyFilterForTokenClassification"),
    Case("aria_text", "aria", {"moe_topk": 2}),
    Case("granitemoe", "granitemoe"),
    Case("granitemoeshared", "granitemoeshared"),
    Case(
        "granitemoehybrid",
        "granitemoehybrid",
        {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16},
    ),
    Case("granitemoe_swa", "granitemoe_swa"),
    Case("cohere2_moe", "cohere2_moe"),
    Case("cohere2_moe", "cohere2_moe", {"expert_selection_fn": "sigmoid"}, id="cohere2_moe-sigmoid"),
    Case("deepseek_v3", "deepseek_v3", GROUPED),
    Case("deepseek_v32", "deepseek_v32", GROUPED),
    Case("deepseek_v32", "deepseek_v32", {**GROUPED, "index_topk": 4}, id="deepseek_v32-sparse"),
    Case("glm4_moe", "glm4_moe", GROUPED),
    Case("glm4_moe_lite", "glm4_moe_lite", GROUPED),
    Case(
        "glm4v_moe_text",
        "glm4v_moe",
        {**GROUPED, "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default", "mrope_section": [1, 1, 2]}},
        model_class="Glm4vMoeTextModel",
    ),
    Case("glm_moe_dsa", "glm_moe_dsa", GROUPED),
    Case("glm_moe_dsa", "glm_moe_dsa", {**GROUPED, "index_topk": 4}, id="glm_moe_dsa-sparse"),
    Case("dots1", "dots1", {**GROUPED, "n_shared_experts": 1}),
    Case("dots3_note_text", "dots3_note", GROUPED),
    Case("dots3_note_text", "dots3_note", {**GROUPED, "index_topk": 4}, id="dots3_note_text-sparse"),
    Case(
        "dots3_note_vision_encoder",
        "dots3_note",
        {"pyramid_num_routed": [8, 8], "adapter_in_dim": 64, "router_scaling_factor": 1.5},
        model_class=_dots3_vision_moe_stack,
        inputs_embeds=True,
    ),
    Case("exaone_moe", "exaone_moe", GROUPED),
    Case("kimi_linear", "kimi_linear", {**GROUPED, **HYBRID, "linear_head_dim": 16, "linear_num_heads": 4}),
    Case("solar_open", "solar_open", GROUPED),
    Case("mimo_v2_flash", "mimo_v2_flash", GROUPED),
    Case("bailing_hybrid", "bailing_hybrid", {**GROUPED, **HYBRID, "linear_head_dim": 16, "linear_num_heads": 4}),
    # From Transformers 5.25: per-layer expert limits, clipping after the activation (layer 0; 0 is none).
    # Before 5.25 the limits are ignored by the experts and by us alike.
    Case(
        "bailing_hybrid",
        "bailing_hybrid",
        {**GROUPED, **HYBRID, "linear_head_dim": 16, "linear_num_heads": 4, "expert_swiglu_limit_list": [1.0, 0]},
        id="bailing_hybrid-clipped",
    ),
    Case("axk1", "axk1", GROUPED),
    Case("minicpm5_moe", "minicpm5_moe", {**GROUPED, "mlp_layer_types": ["sparse", "sparse"]}),
    Case("axk2", "axk2", {**GROUPED, "n_group": None, "topk_group": None}),
    Case("axk2", "axk2", GROUPED, fused_router=False, id="axk2-grouped"),
    Case("axk2", "axk2", {**GROUPED, "n_group": None, "topk_group": None, "index_topk": 4}, id="axk2-sparse"),
    # Clamped SwiGLU experts: the expert projections have std ~1.6 in these tiny models, so swiglu_limit
    # 1.0 clips ~26% of gate and ~53% of up values (the tests fail without the clamp).
    Case(
        "glm5_next_text",
        "glm5_next",
        {
            **GROUPED,
            **HYBRID,
            "qk_rope_head_dim": 0,  # its DSA attention layers are NoPE
            **dict(index_n_heads=2, index_head_dim=16, index_topk=8, index_kpool=4),
            "swiglu_limit": 1.0,
        },
        model_class="Glm5NextTextModel",
    ),
    Case("hy_v4", "hy_v4", {**GROUPED, "mlp_layer_types": ["sparse", "sparse"], "swiglu_limit": 1.0}),
    Case(
        "hy_v4_vl_text",
        "hy_v4_vl",
        {
            **GROUPED,
            "mlp_layer_types": ["sparse", "sparse"],
            "swiglu_limit": 1.0,
            # M-RoPE sections must sum to qk_rope_head_dim // 2
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [2, 1, 1]},
        },
        model_class="HYV4VLTextModel",
    ),
    # Ungated relu2 experts behind a latent projection (moe_latent_size), one attention layer, first:
    # Transformers 5.25's Nemotron-H reads the cache's length from layer 0, which a MoE layer has no cache for.
    Case(
        "nemotron_h",
        "nemotron_h",
        {**GROUPED, "layers_block_type": ["full_attention", "moe", "moe"], "num_hidden_layers": 3, "moe_latent_size": 48,
         "moe_shared_expert_intermediate_size": 32},
    ),
    Case("beam", "beam", {**GROUPED, "layer_types": ["sliding_attention", "full_attention"], "mlp_layer_types": ["sparse", "sparse"]}),
    Case("afmoe", "afmoe", {"route_scale": 1.7}),
    Case("hy_v3", "hy_v3"),
    Case("minimax_m2", "minimax_m2"),
    Case("minimax_m3_vl_text", "minimax_m3_vl"),
    # Step3p7's text model (model type "step3p5"; not in Transformers 5.17): experts clipped after the SiLU
    # on layer 0 (limit 1.0 clips ~35% of silu(gate) and ~75% of up values; 0 is none); the block scales
    # the routed output.
    Case(
        "step3p5",
        "step3p7",
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 4,  # required: the text model always builds a sliding mask
            "mlp_layer_types": ["sparse", "sparse"],
            "share_expert_dim": 32,
            "swiglu_limits": [1.0, 0],
            "moe_router_scaling_factor": 2.5,
        },
        model_class="Step3p7TextModel",
        id="step3p7",
    ),
    Case("laguna", "laguna", {"moe_router_logit_softcapping": 0.0}),
    Case("laguna", "laguna", {"moe_router_logit_softcapping": 2.0}, fused_router=False, id="laguna-softcap"),
    Case("lfm2_moe", "lfm2_moe", {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"], "routed_scaling_factor": 1.5}),
    Case("lfm2_moe", "lfm2_moe", {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"], "use_expert_bias": False}, id="lfm2_moe-no-bias"),
    Case("flint", "flint"),
    Case("phimoe", "phimoe"),
    Case("gemma4_text", "gemma4", {"enable_moe_block": True, "top_k_experts": 2}),
    Case("diffusion_gemma_text", "diffusion_gemma", {"top_k_experts": 2}, model_class="DiffusionGemmaEncoderTextModel"),
    Case("inkling_text", "inkling"),
    Case("zaya", "zaya", {"num_experts_per_tok": 1}),
    Case("kolibri1", "kolibri1"),
    # One indexed-attention layer; index_num_heads (12 by default) must fit the 2 query heads per key head.
    Case("kolibri1_1", "kolibri1_1", {"layer_types": ["sliding_attention", "indexed_attention"], "index_num_heads": 2}),
    # A hash-routed layer (token-id table) and a sqrtsoftplus top-k layer: both routers stay stock.
    Case("deepseek_v4", "deepseek_v4", {"mlp_layer_types": ["hash_moe", "moe"], "swiglu_limit": 1.0}, fused_router=False),
)
CASE_BY_NAME = {case.name: case for case in CASES}
INSTALLED_MODEL_TYPES = set(CONFIG_MAPPING.keys())
TRANSFORMERS_DIR = Path(transformers.__file__).parent


# ---------------------------------------------------------------------------------------------
# Building tiny random models.


def tiny_config(case: Case):
    config_class = CONFIG_MAPPING[case.model_type]
    defaults = config_class()
    known = set(defaults.to_dict()) | set(getattr(config_class, "attribute_map", {}))
    kwargs = {key: value for key, value in GENERIC_CONFIG.items() if key in known}
    if "kv_lora_rank" in known:  # multi-head latent attention: RoPE on qk_rope_head_dim, no grouped KV
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "head_dim" in kwargs:
            kwargs["head_dim"] = GENERIC_CONFIG["qk_rope_head_dim"]
    kwargs.update(case.config)
    return config_class(**kwargs)


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-zero random values in every floating parameter and buffer (router weights and biases,
    correction biases, norms, scales...), large enough for the routing to vary between tokens.
    RoPE frequencies are left alone: they are derived, not weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or "inv_freq" in name:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if tensor.dim() >= 2:  # weight matrices, expert weights
                values = torch.randn(tensor.shape, generator=generator) * 0.2
            elif any(word in name for word in ("norm", "scale", "scalar")) and not leaf.endswith("bias"):
                values = 1.0 + torch.randn(tensor.shape, generator=generator) * 0.05  # multiplicative: near 1
            else:  # biases: router and expert biases, correction biases (sigmoid scores are in (0, 1))
                values = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(values.to(tensor.dtype))


def build(case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
    if case.model_type not in INSTALLED_MODEL_TYPES:
        pytest.skip(f"{case.model_type} is not in transformers {transformers.__version__}")
    if case.family not in decorated_families():  # e.g. aria before 5.23 had its own eager MoE
        pytest.skip(f"{case.family}'s experts are not decorated in transformers {transformers.__version__}")
    config = tiny_config(case)
    torch.manual_seed(0)
    if case.model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif callable(case.model_class):
        model = case.model_class(config)
    else:
        model_class = getattr(transformers, case.model_class, None)
        if model_class is None:
            pytest.skip(f"{case.model_class} is not in transformers {transformers.__version__}")
        model = model_class(config)
    randomize_(model)
    return model.to(dtype).eval()


def input_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def forward(model: nn.Module, ids: torch.Tensor, **kwargs) -> Any:
    with torch.no_grad():
        if ids.is_floating_point():
            return model(inputs_embeds=ids, **kwargs)
        return model(input_ids=ids, **kwargs)


def main_output(output: Any) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def rel_max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict plus the non-persistent buffers."""
    snapshot = {f"buffer:{name}": buffer.clone() for name, buffer in model.named_buffers()}
    snapshot.update({key: value.clone() for key, value in model.state_dict().items()})
    return snapshot


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if is_experts_module(module)]


def router_of(model: nn.Module, experts_name: str) -> nn.Module:
    block = model.get_submodule(experts_name.rsplit(".", 1)[0])
    return getattr(block, ADAPTER_BY_MODEL_TYPE[model.get_submodule(experts_name).config.model_type].router_attr)


def can_generate(model: nn.Module) -> bool:
    return hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()


def greedy(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# The family tests.


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_family_matches_stock(case: Case) -> None:
    model = build(case)
    found = experts_modules(model)
    assert found, f"the tiny {case.name} config built no MoE block: make its layers MoE"
    assert {module.config.model_type for _, module in found} == {case.model_type}

    ids = input_ids()
    if case.inputs_embeds:
        ids = torch.randn(2, 9, found[0][1].config.hidden_size, generator=torch.Generator().manual_seed(1))
    types_before = {name: type(module) for name, module in model.named_modules()}
    state_before = tensors(model)
    implementations_before = experts_implementations(model)
    stock = forward(model, ids)
    stock_router_logits = None
    if "router_logits" in _recordable_outputs(model):
        stock_router_logits = getattr(forward(model, ids, output_router_logits=True), "router_logits", None)
    stock_tokens = greedy(model, ids) if can_generate(model) else None

    accelerate(model)
    try:
        report = patch_report(model)
        assert len(report.experts) == len(found)
        # (6) the experts run through Transformers' experts interface: their configs name ours, classes stay.
        assert set(experts_implementations(model)) == {EXPERTS_IMPLEMENTATION}
        assert all(type(module) is types_before[name] for name, module in found)
        adapter = ADAPTER_BY_MODEL_TYPE[case.model_type]
        routers = [router_of(model, name) for name, _ in found]
        expect_fused = adapter.routing is not None and all(
            case.fused_router(router) if callable(case.fused_router) else case.fused_router for router in routers
        )
        # (5) a router the adapter means to fuse must be fused, or a family silently falls back.
        assert bool(report.routers) == expect_fused, f"routers fused: {report.routers}, expected fused: {expect_fused}"
        if expect_fused:
            assert len(report.routers) == len(found)

        # (1) logits
        fast = forward(model, ids)
        error = rel_max_error(main_output(fast), main_output(stock))
        assert error < 1e-4, f"{case.name}: relative max error {error:.2e} against the stock model"
        # (3) router logits recorded by the output hooks on the router modules
        if stock_router_logits is not None:
            fast_router_logits = forward(model, ids, output_router_logits=True).router_logits
            assert len(fast_router_logits) == len(stock_router_logits)
            for fast_layer, stock_layer in zip(fast_router_logits, stock_router_logits, strict=True):
                assert fast_layer.dtype == stock_layer.dtype and fast_layer.shape == stock_layer.shape
                # Layers after the first see hidden states that went through fused experts.
                assert rel_max_error(fast_layer, stock_layer) < 1e-4
        # (2) greedy generation
        if stock_tokens is not None:
            assert torch.equal(greedy(model, ids), stock_tokens)
    finally:
        unpatch(model)

    # (4) unpatch restores every class, every tensor (bitwise) and the experts implementation names.
    assert {name: type(module) for name, module in model.named_modules()} == types_before
    assert experts_implementations(model) == implementations_before
    state_after = tensors(model)
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[key], state_before[key]) for key in state_before)


def experts_implementations(model: nn.Module) -> list[str | None]:
    return [module.config._experts_implementation for _, module in experts_modules(model)]


def set_experts_implementation(model: nn.Module, name: str) -> None:
    """As a user would: the model's own method; a stack of blocks (no PreTrainedModel) through its configs."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:
        for _, module in experts_modules(model):
            module.config._experts_implementation = name
    assert set(experts_implementations(model)) == {name}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_family_honours_a_stock_experts_choice(case: Case, monkeypatch) -> None:
    """After accelerate, set_experts_implementation("eager") runs Transformers' experts (never our kernel),
    with the same outputs as stock "eager"; setting ours back runs the kernel again."""
    model = build(case)
    ids = input_ids()
    if case.inputs_embeds:
        ids = torch.randn(2, 9, experts_modules(model)[0][1].config.hidden_size, generator=torch.Generator().manual_seed(1))
    set_experts_implementation(model, "eager")
    stock = main_output(forward(model, ids))
    set_experts_implementation(model, "grouped_mm")
    calls = []
    real = hf_moe_accel.kernels.fused_experts
    monkeypatch.setattr(hf_moe_accel.kernels, "fused_experts", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    accelerate(model)
    try:
        set_experts_implementation(model, "eager")
        error = rel_max_error(main_output(forward(model, ids)), stock)
        assert not calls and error < 1e-4, (len(calls), error)
        set_experts_implementation(model, EXPERTS_IMPLEMENTATION)
        error = rel_max_error(main_output(forward(model, ids)), stock)
        assert calls and error < 1e-4, (len(calls), error)  # (Ernie-VL's vision experts see no tokens here)
    finally:
        unpatch(model)


def _recordable_outputs(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(type(module), "_can_record_outputs", None) or {})
    return names


# bfloat16 on representative families: logits close to stock within bf16 tolerance.
BF16_CASES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "hy_v4", "nemotron_h")


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_close_to_stock(name: str) -> None:
    model = build(CASE_BY_NAME[name], dtype=torch.bfloat16)
    ids = input_ids()
    stock = main_output(forward(model, ids))
    accelerate(model)
    try:
        assert patch_report(model).routers
        fast = main_output(forward(model, ids))
    finally:
        unpatch(model)
    assert fast.dtype == stock.dtype  # bfloat16 (Nemotron-H's lm_head upcasts its logits to float32)
    error = rel_max_error(fast, stock)
    assert error < 3e-2, f"{name} bf16: relative max error {error:.2e}"
    same_argmax = (fast.argmax(-1) == stock.argmax(-1)).float().mean().item()
    assert same_argmax >= 0.8, f"{name} bf16: argmax agrees on {same_argmax:.0%} of positions"


# ---------------------------------------------------------------------------------------------
# Coverage: adapters <-> cases <-> the decorated families of the installed transformers.


@functools.cache
def decorated_families() -> frozenset[str]:
    """transformers/models/ folders whose experts class is decorated with use_experts_implementation."""
    pattern = re.compile(r"^@use_experts_implementation\b", re.MULTILINE)
    return frozenset(
        path.parent.name for path in TRANSFORMERS_DIR.glob("models/*/modeling_*.py") if pattern.search(path.read_text())
    )


def test_every_adapter_has_a_case() -> None:
    model_types = [t for adapter in ADAPTERS for t in adapter.model_types]
    assert len(model_types) == len(set(model_types)), "a model type is claimed by two adapters"
    missing = sorted(set(model_types) - {case.model_type for case in CASES})
    assert not missing, f"add a tiny-model Case to tests/test_families.py for: {missing}"
    orphans = sorted({case.model_type for case in CASES} - set(model_types))
    assert not orphans, f"cases without an adapter: {orphans}"


def test_every_decorated_family_is_decided() -> None:
    covered = {case.family for case in CASES}
    undecided = sorted(decorated_families() - covered - set(UNSUPPORTED))
    assert not undecided, (
        f"transformers {transformers.__version__} has decorated MoE families with neither an adapter nor an "
        f"UNSUPPORTED entry: {undecided}. Add a FamilyAdapter (docs/ADAPTERS.md) and a Case, or list it in UNSUPPORTED."
    )
    both = sorted(covered & set(UNSUPPORTED))
    assert not both, f"families both covered and listed unsupported: {both}"


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_has_no_adapter(family: str) -> None:
    assert not any(t == family or t.startswith(family + "_") for t in ADAPTER_BY_MODEL_TYPE), family
    documented = (Path(__file__).parents[1] / "docs" / "ADAPTERS.md").read_text()
    assert f"`{family}`" in documented, f"docs/ADAPTERS.md should say why {family} is unsupported"


# ---------------------------------------------------------------------------------------------
# Errors and idempotence.


def test_model_without_moe_raises_value_error() -> None:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"no MoE block found in LlamaForCausalLM") as error:
        accelerate(model)
    assert not isinstance(error.value, UnsupportedMoEError)


def test_undecorated_moe_family_raises_unsupported() -> None:
    """JetMoE keeps its own experts forward (not decorated): a clear UnsupportedMoEError, not a silent no-op."""
    if "jetmoe" not in INSTALLED_MODEL_TYPES:
        pytest.skip(f"jetmoe is not in transformers {transformers.__version__}")
    config = CONFIG_MAPPING["jetmoe"](hidden_size=32, num_hidden_layers=1, num_key_value_heads=2, vocab_size=64)
    model = transformers.JetMoeForCausalLM(config)
    with pytest.raises(UnsupportedMoEError) as error:
        accelerate(model)
    message = str(error.value)
    assert "JetMoeForCausalLM" in message and "use_experts_implementation" in message, message
    assert "mixtral" in message and "deepseek_v3" in message, message  # the supported families are listed
    assert "docs/ADAPTERS.md" in message
    assert not hf_moe_accel.is_accelerated(model)


def test_unknown_option_raises_type_error() -> None:
    model = build(CASE_BY_NAME["mixtral"])
    with pytest.raises(TypeError, match="bogus"):
        accelerate(model, bogus=1)


def test_accelerate_twice_does_not_double_patch() -> None:
    model = build(CASE_BY_NAME["qwen2_moe"])
    originals = {name: type(module) for name, module in model.named_modules()}
    accelerate(model)
    accelerate(model)
    try:
        for name, module in model.named_modules():
            if type(module) is not originals[name]:
                assert type(module).__bases__ == (originals[name],), f"{name} patched twice: {type(module).__mro__}"
        assert hf_moe_accel.patch_report(model).routers
        # The shared expert (and its sigmoid gate) of Qwen2-MoE stay stock.
        block = model.model.layers[0].mlp
        assert type(block.shared_expert) is originals["model.layers.0.mlp.shared_expert"]
    finally:
        unpatch(model)
    assert {name: type(module) for name, module in model.named_modules()} == originals


class _ReversedRouter(nn.Module):
    """A router returning (ids, weights, logits), as GraniteMoE's did in Transformers 5.17."""

    def __init__(self, hidden_size: int = 16, num_experts: int = 6, top_k: int = 2):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size, generator=torch.Generator().manual_seed(0)))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden_states, self.weight).float()
        top_logits, ids = logits.topk(self.top_k, dim=-1)
        return ids, torch.softmax(top_logits, dim=-1).type_as(hidden_states), logits


def test_router_output_order_follows_the_stock_router() -> None:
    from hf_moe_accel.patches.adapter import FamilyAdapter
    from hf_moe_accel.patches.families import _topk_logits_softmax
    from hf_moe_accel.patches.router import patch_router
    from hf_moe_accel.patches.swap import restore

    router = _ReversedRouter()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    stock = router(x)
    assert patch_router(router, FamilyAdapter(("test",), routing=_topk_logits_softmax, logits="upcast"))
    try:
        fast = router(x)
    finally:
        restore(router)
    assert torch.equal(fast[0].sort(-1).values, stock[0].sort(-1).values)
    torch.testing.assert_close(fast[1].sort(-1).values, stock[1].sort(-1).values)
    torch.testing.assert_close(fast[2], stock[2])


def test_training_mode_keeps_the_stock_path() -> None:
    """The kernels have no backward: in train() the router and experts run their stock forward."""
    model = build(CASE_BY_NAME["qwen3_moe"])
    accelerate(model)
    try:
        model.train()
        loss = model(input_ids=input_ids(), labels=input_ids()).loss
        loss.backward()
        router = model.model.layers[0].mlp.gate
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None
    finally:
        unpatch(model)


def test_attention_name_tests_keep_sdpa() -> None:
    """Modeling code that compares the attention implementation's name with "sdpa" would take its
    non-SDPA branch under our decode attention's name: such models keep "sdpa" (the sparse cases above
    check their logits); common families are switched."""
    from hf_moe_accel.patches.attention import DECODE_ATTENTION, sdpa_name_test

    model = build(CASE_BY_NAME["qwen3_moe"])
    assert sdpa_name_test(model) is None
    accelerate(model)
    assert model.config._attn_implementation == DECODE_ATTENTION
    unpatch(model)
    model = build(CASE_BY_NAME["deepseek_v32-sparse"])
    assert sdpa_name_test(model) == "transformers.models.deepseek_v32.modeling_deepseek_v32"
    accelerate(model)
    assert model.config._attn_implementation == "sdpa"
    unpatch(model)


def test_gemma4_kv_shared_layers_match_stock_when_keeping_several_logits() -> None:
    """Gemma-4 (Transformers 5.25) slices its KV-shared layers' queries to the kept logits unless the
    implementation is named "sdpa" and a mask is None; under another name SDPA's causal flag would
    misalign them. Logits for 1, 2 and 3 kept positions equal stock's."""
    case = CASE_BY_NAME["gemma4_text"]
    model = build(Case(case.model_type, case.family, {**case.config, "num_hidden_layers": 3, "num_kv_shared_layers": 1,
                                                      "layer_types": ["sliding_attention", "full_attention", "full_attention"]}))
    ids = input_ids()
    stock = [forward(model, ids, logits_to_keep=keep).logits for keep in (1, 2, 3)]
    accelerate(model, cuda_graphs=False)
    try:
        for keep, expected in zip((1, 2, 3), stock):
            assert rel_max_error(forward(model, ids, logits_to_keep=keep).logits, expected) < 1e-4, keep
    finally:
        unpatch(model)


@pytest.mark.parametrize("name", ["lfm2_moe", "mistral4"])
def test_model_dtype_scoring_keeps_stock_router_in_half_precision(name: str) -> None:
    """LFM2-MoE and Mistral-4 select experts on scores rounded to the model dtype; the kernels score in
    float32, so bf16 models keep the stock router (float32 ones are fused, see the family test), also
    when the model is cast after `accelerate`."""
    model = build(CASE_BY_NAME[name], dtype=torch.bfloat16)
    accelerate(model)
    try:
        assert not patch_report(model).routers
    finally:
        unpatch(model)

    model = build(CASE_BY_NAME[name])
    accelerate(model)
    try:
        assert patch_report(model).routers
        model.to(torch.bfloat16)
        experts_name, _ = experts_modules(model)[0]
        router = router_of(model, experts_name)
        block = model.get_submodule(experts_name.rsplit(".", 1)[0])
        args = (torch.randn(9, 64, generator=torch.Generator().manual_seed(2)).bfloat16(),)
        if hasattr(block, "expert_bias"):  # LFM2-MoE's block passes its expert bias to the router
            args += (block.expert_bias,)
        with torch.no_grad():
            fast = router(*args)
            stock = type(router).__bases__[0].forward(router, *args)
        assert all(torch.equal(a, b) for a, b in zip(fast, stock, strict=True))
    finally:
        unpatch(model)


@pytest.mark.parametrize("name", ["lara_mini", "hy_v4_vl_text", "longcat_flash"])
def test_float32_logits_router_in_half_precision_matches_stock(name: str) -> None:
    """Float32 family tests can't tell how the router's linear runs or what dtype its weights take. In
    float16, each fused router returns the stock router's dtypes, logits, experts and weights (Lara-Mini:
    float32 logits, weights cast to the input dtype; HY-V4-VL and LongCat-Flash: float32 logits and weights)."""
    model = build(CASE_BY_NAME[name], dtype=torch.float16)
    accelerate(model)
    try:
        found = experts_modules(model)
        assert len(patch_report(model).routers) == len(found)
        for layer, (experts_name, _) in enumerate(found):
            router = router_of(model, experts_name)
            x = torch.randn(9, 64, generator=torch.Generator().manual_seed(layer)).half()
            with torch.no_grad():
                fast_logits, fast_weights, fast_ids = router(x)
                stock_logits, stock_weights, stock_ids = type(router).__bases__[0].forward(router, x)
            assert (fast_logits.dtype, fast_weights.dtype) == (stock_logits.dtype, stock_weights.dtype)
            assert torch.equal(fast_logits, stock_logits)
            fast_ids, fast_order = fast_ids.sort(-1)
            stock_ids, stock_order = stock_ids.sort(-1)
            assert torch.equal(fast_ids, stock_ids)
            torch.testing.assert_close(fast_weights.gather(-1, fast_order), stock_weights.gather(-1, stock_order))
    finally:
        unpatch(model)


def test_longcat_flash_case_picks_zero_experts() -> None:
    """The longcat_flash case checks the zero experts only if its fused routers pick some (ids >= the
    routed experts' count, which the block turns into the identity) beside routed ones."""
    model = build(CASE_BY_NAME["longcat_flash"])
    chosen: list[torch.Tensor] = []
    accelerate(model)
    routers = [layer.mlp.router for layer in model.model.layers]
    hooks = [router.register_forward_hook(lambda module, args, out: chosen.append(out[2])) for router in routers]
    try:
        assert len(patch_report(model).routers) == len(routers)
        forward(model, input_ids())
    finally:
        for hook in hooks:
            hook.remove()
        unpatch(model)
    ids = torch.cat(chosen)
    routed = model.config.n_routed_experts
    assert (ids >= routed).any() and (ids < routed).any(), ids
