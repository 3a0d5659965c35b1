"""One adapter per model family: how its router routes and, where it isn't the default, how its
experts activate. Keyed by `config.model_type` of the experts' config (the text config's model type
for multimodal models, e.g. "qwen3_vl_moe_text").

Each routing builder below reproduces one stock router forward of Transformers (5.17 to 5.25) as a
RoutingSpec; the docstring names the families and says what the stock code does. A builder
returning None leaves that router's stock forward in place (exact by construction).

Families whose routers stay stock (routing=None): phimoe (sparsemixer), gemma4 and diffusion_gemma
(RMS-normed, rescaled router input and a per-expert scale on the weights), inkling (returns shared-
expert gammas beside the triple), zaya (router MLP carrying state across layers, a skip expert),
kolibri1 and kolibri1_1 (correction bias added to the logits, sigmoid after selection), deepseek_v4
(sqrtsoftplus scores in the model dtype; hash routing in the first layers); per router: axk2 with
grouped routing (groups masked with 0.0, not -inf), laguna with router logit softcapping, longcat_flash
with a classifier bias (config.router_bias; the stock forward ignores it), jamba in
Transformers 5.17 (a plain nn.Linear router; the block routes); per dtype: lfm2_moe and mistral4 in
half precision (they select on scores rounded to the model dtype, the kernels on float32 scores).

Families left out (the registry raises UnsupportedMoEError; docs/ADAPTERS.md says why):
inkling2, inkling2_loop, muse_spark, ergo.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ..kernels.spec import Activation, RoutingSpec
from .adapter import FamilyAdapter
from .experts import activation_from_act_fn

# What the stock router does with the final weights: keep them in float32, or cast them to its
# input dtype (which is also the logits' dtype for routers whose linear runs in the input dtype).
Cast = Literal["float32", "input"]


def _spec(router: nn.Module, input_dtype: torch.dtype, cast: Cast, **rule: Any) -> RoutingSpec:
    """The RoutingSpec for `router` (its `top_k` and `num_experts`) with the routing `rule`; the weights
    keep float32 or take the router's input dtype, as `cast` says."""
    weights_dtype = None if cast == "float32" or input_dtype == torch.float32 else input_dtype
    return RoutingSpec(top_k=int(router.top_k), num_experts=int(router.num_experts), weights_dtype=weights_dtype, **rule)


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def _norm_topk_prob(router: nn.Module, renormalize: bool | None) -> bool:
    """An explicit choice, or the router's `norm_topk_prob` flag (config.norm_topk_prob)."""
    return bool(router.norm_topk_prob) if renormalize is None else renormalize


# ---------------------------------------------------------------------------------------------
# Softmax over all experts, then top-k.


def _softmax_topk(router: nn.Module, input_dtype: torch.dtype, *, renormalize: bool | None = None, cast: Cast = "input") -> RoutingSpec:
    """softmax(logits) in float32, top-k, renormalised (optionally), then cast or kept in float32.

    Qwen2/3-MoE, Qwen3-Next, Qwen3-Omni, Qwen4-Exp, OLMoE, FlexOlmo, Mellum: renormalise per
    `norm_topk_prob`, cast to the logits' dtype. Lara-Mini: the same on float32 logits (input and
    weight upcast), weights cast to the input dtype. Qwen3.5-MoE, Qwen3-VL-MoE: always renormalise.
    Jamba: never. Mixtral, MiniMax: always, weights kept in float32.
    """
    return _spec(router, input_dtype, cast, scoring="softmax", renormalize=_norm_topk_prob(router, renormalize))


def _hunyuan(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """HunYuan-MoE-V1: the gate `wg` is created in float32 and the input is cast to its dtype; softmax,
    top-k, renormalised, weights cast to the logits' dtype, i.e. the gate's (float32 unless the model
    was cast after loading; read at patch time)."""
    logits_dtype = router.wg.weight.dtype
    return _spec(router, logits_dtype, "input", scoring="softmax", renormalize=True)


def _ernie(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """Ernie-4.5-MoE and -VL: float32 softmax; experts selected on probs + moe_statics'
    e_score_correction_bias; the gathered probs renormalised by max(sum, moe_norm_min): the same as
    plain renormalisation whenever the k probabilities sum to at least moe_norm_min (1e-12);
    weights cast to the input dtype."""
    return _spec(router, input_dtype, "input", scoring="softmax", has_correction_bias=True, renormalize=True)


def _longcat_flash(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec | None:
    """LongCat-Flash: float32 logits, softmax over the routed experts and the zero (identity) experts,
    selection on probs + e_score_correction_bias, no renormalisation, times routed_scaling_factor;
    float32 weights. Zero experts get ids >= the routed experts' count: the stock MoE block turns them
    into the identity output and hands the experts in-range ids with weight 0. The stock linear ignores
    the classifier's bias (config.router_bias), the fused one would add it: such routers stay stock."""
    if router.classifier.bias is not None:
        return None
    return RoutingSpec(
        top_k=int(router.top_k),
        num_experts=int(router.n_routed_experts),  # routed + zero experts (router.num_experts: routed only)
        scoring="softmax",
        has_correction_bias=True,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def _deepseek_v2(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec | None:
    """DeepSeek-V2 (and DeepSeek-OCR-2, Unlimited-OCR text): float32 softmax; top-k "greedy", or
    "group_limited_greedy" over the topk_group groups with the largest max prob (other groups
    masked with 0.0, which is -inf for probs > 0); no renormalisation; routed_scaling_factor;
    float32 weights."""
    if router.topk_method == "greedy":
        groups = {}
    elif router.topk_method == "group_limited_greedy":
        groups = {"n_group": int(router.num_group), "topk_group": int(router.topk_group), "group_score": "max"}
    else:  # the stock forward fails on other methods too
        return None
    return _spec(router, input_dtype, "float32", scoring="softmax", routed_scaling_factor=float(router.routed_scaling_factor), **groups)


def _mistral4(
    router: nn.Module, input_dtype: torch.dtype, *, renormalize: bool | None = None, cast: Cast = "input"
) -> RoutingSpec | None:
    """Mistral-4 / Mistral-Large-4: softmax; group-limited top-k, groups scored by their top-2 prob
    sum (others masked with 0.0: -inf for probs > 0); renormalised (+1e-20) per `norm_topk_prob`
    (always for Large-4); routed_scaling_factor. Large-4 runs in float32 throughout. Mistral-4 takes
    the softmax in the model dtype and selects on those rounded probs, where the kernels select on
    float32 ones: ties in half precision would pick other experts, so half-precision inputs keep the
    stock router."""
    if cast == "input" and _half(input_dtype):
        return None
    return _spec(
        router,
        input_dtype,
        cast,
        scoring="softmax",
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        group_score="top2_sum",
        renormalize=_norm_topk_prob(router, renormalize),
        renorm_eps=1e-20,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


# ---------------------------------------------------------------------------------------------
# Top-k over the raw logits, then softmax over the k chosen ones.


def _topk_logits_softmax(router: nn.Module, input_dtype: torch.dtype, *, cast: Cast = "input", scale: float = 1.0) -> RoutingSpec:
    """top-k over the logits, softmax over those k. GPT-OSS (router bias; softmax in the logits'
    dtype), Aria, GraniteMoE/-Shared/-Hybrid/-SWA (float32 softmax cast to the input dtype),
    Cohere2-MoE with expert_selection_fn="softmax"."""
    return _spec(router, input_dtype, cast, scoring="softmax_topk_logits", routed_scaling_factor=scale)


def _privacy_filter(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """OpenAI privacy filter: GPT-OSS routing in float32 (router bias), weights divided by top_k. (Its
    eager experts forward also upcasts the expert GEMMs to float32; the kernels, like Transformers'
    grouped_mm path, run them in the weights' dtype.)"""
    return _topk_logits_softmax(router, input_dtype, cast="float32", scale=1.0 / router.top_k)


def _cohere2(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """Cohere2-MoE: top-k over the logits, then softmax over the k, or sigmoid of the k (renormalised
    per `norm_topk_prob`, no epsilon); weights cast to the input dtype. Sigmoid is monotonic, so top-k
    over sigmoid(logits) picks the same experts except between logits whose sigmoids round to the
    same float32 (above ~17)."""
    if router.expert_selection_fn == "softmax":
        return _topk_logits_softmax(router, input_dtype)
    return _spec(router, input_dtype, "input", scoring="sigmoid", renormalize=bool(router.norm_topk_prob))


# ---------------------------------------------------------------------------------------------
# Sigmoid scores; selection on scores + a correction bias; weights from the unbiased scores.


def _deepseek_v3(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """DeepSeek-V3 and the families that copy its router (DeepSeek-V3.2, GLM-4-MoE/-Lite/-4.5V/-DSA,
    GLM-5-Next text, dots1, dots3 text, EXAONE-MoE, Kimi-Linear, Solar-Open, MiMo-V2-Flash,
    Bailing-Hybrid, A.X-K1, Beam, HY-V4, HY-V4-VL text, Nemotron-H, MiniCPM5-MoE): float32 logits,
    sigmoid, + e_score_correction_bias for selection, group-limited top-k (groups scored by the sum of
    their top-2 biased scores, the others masked with -inf), renormalised (+1e-20) per
    `norm_topk_prob`, times routed_scaling_factor (Beam applies it in the block); float32 weights.
    """
    n_group = int(router.num_group or 1)
    return _spec(
        router,
        input_dtype,
        "float32",
        scoring="sigmoid",
        has_correction_bias=True,
        n_group=n_group,
        topk_group=int(router.topk_group) if n_group > 1 else 1,
        group_score="top2_sum",
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-20,
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
    )


def _axk2(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec | None:
    """A.X-K2: DeepSeek-V3 routing, but the groups left out are masked with 0.0 instead of -inf, which
    selects a masked expert whenever biased scores go negative: grouped routers keep the stock forward;
    without groups (n_group None or 1) it is DeepSeek-V3's."""
    if int(router.num_group or 1) > 1:
        return None
    return _deepseek_v3(router, input_dtype)


def _sigmoid_biased(
    router: nn.Module, input_dtype: torch.dtype, *, renorm_eps: float, scale_attr: str | None = None, cast: Cast = "float32"
) -> RoutingSpec:
    """sigmoid, selection on scores + correction bias, weights renormalised (+renorm_eps), times the
    router's `scale_attr`. AFMoE (route_scale, eps 1e-20), HY-V3 and the dots3 vision experts
    (router_scaling_factor, eps 1e-20), MiniMax-M2, MiniMax-M3-VL and Step3p7 text (no eps, no scale;
    Step3p7's block scales the experts' output itself): float32 weights. Laguna (no eps; weights cast
    to the input dtype) unless its router logits are softcapped."""
    return _spec(
        router,
        input_dtype,
        cast,
        scoring="sigmoid",
        has_correction_bias=True,
        renormalize=True,
        renorm_eps=renorm_eps,
        routed_scaling_factor=float(getattr(router, scale_attr)) if scale_attr else 1.0,
    )


def _laguna(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec | None:
    if router.router_logit_softcapping > 0.0:  # tanh softcap on the logits: not in RoutingSpec
        return None
    return _sigmoid_biased(router, input_dtype, renorm_eps=0.0, cast="input")


def _lfm2_moe(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec | None:
    """LFM2-MoE: sigmoid of the model-dtype logits, selection on scores + the block's expert_bias
    when config.use_expert_bias, renormalised (+1e-6) per `norm_topk_prob`, times
    routed_scaling_factor, weights in the logits' dtype. The stock sigmoid runs in the model dtype
    and selects on those rounded scores, where the kernels select on float32 ones: ties in half
    precision pick other experts (seen on tiny bf16 models), so half-precision inputs keep the stock
    router; float32 is exact."""
    if _half(input_dtype):
        return None
    return _spec(
        router,
        input_dtype,
        "input",
        scoring="sigmoid",
        has_correction_bias=bool(router.use_expert_bias),
        renormalize=bool(router.norm_topk_prob),
        renorm_eps=1e-6,
        routed_scaling_factor=float(router.routed_scaling_factor),
    )


def _flint(router: nn.Module, input_dtype: torch.dtype) -> RoutingSpec:
    """Flint: float32 logits, sigmoid, top-k (no bias), renormalised per `norm_topk_prob` (no eps);
    float32 weights."""
    return _spec(router, input_dtype, "float32", scoring="sigmoid", renormalize=bool(router.norm_topk_prob))


# ---------------------------------------------------------------------------------------------
# Experts with their own `_apply_gate`.


def _swiglu_oai(alpha_attr: str, limit_attr: str):
    """GPT-OSS's clamped SwiGLU, alpha and limit read from the experts module (GPT-OSS: alpha/limit,
    interleaved; the privacy filter: alpha/limit, concatenated; MiniMax-M3-VL: swiglu_alpha/limit,
    concatenated). The gate/up order comes from the decorator's is_concatenated flag."""

    def build(experts: nn.Module) -> Activation:
        return Activation("swiglu_oai", alpha=float(getattr(experts, alpha_attr)), limit=float(getattr(experts, limit_attr)))

    return build


def _swiglu_clamped(limit_attr: str):
    """SwiGLU with GPT-OSS's clamps but no alpha: silu(min(gate, limit)) * clamp(up, -limit, limit), the
    limit read from the experts module (DeepSeek-V4: `limit`; GLM-5-Next, HY-V4, HY-V4-VL:
    `swiglu_limit`). GLM-5-Next and HY-V4(-VL) hard-code F.silu; DeepSeek-V4 applies its `act_fn`
    (config.hidden_act), so any other act_fn than SiLU is refused (None: the registry raises
    UnsupportedMoEError)."""

    def build(experts: nn.Module) -> Activation | None:
        if hasattr(experts, "act_fn") and getattr(activation_from_act_fn(experts), "kind", None) != "silu":
            return None
        return Activation("swiglu_clamped", limit=float(getattr(experts, limit_attr)))

    return build


def _swiglu_post_clamped(experts: nn.Module) -> Activation | None:
    """Experts that clip where their layer's swiglu limit is set (`limit`, from config.swiglu_limits):
    min(act(gate), limit) * clamp(up, -limit, limit), the gate clipped after its activation; without a
    limit (None) act_fn(gate) * up. Bailing-Hybrid (Ling; from Transformers 5.25, no limit before) and
    Step3p7's text model. Clipping with another act_fn than SiLU is refused (None)."""
    activation = activation_from_act_fn(experts)
    limit = getattr(experts, "limit", None)
    if limit is None:
        return activation
    if getattr(activation, "kind", None) != "silu":
        return None
    return Activation("swiglu_post_clamped", limit=float(limit))


ADAPTERS: tuple[FamilyAdapter, ...] = (
    # Softmax, then top-k.
    FamilyAdapter(("mixtral", "minimax"), routing=partial(_softmax_topk, renormalize=True, cast="float32")),
    FamilyAdapter(
        (
            "qwen2_moe",
            "qwen3_moe",
            "qwen3_next",
            "qwen4_exp_text",
            "qwen3_omni_moe_text",
            "qwen3_omni_moe_talker_text",
            "olmoe",
            "flex_olmo",
            "mellum",
        ),
        routing=_softmax_topk,
    ),
    FamilyAdapter(("qwen3_5_moe_text", "qwen3_vl_moe_text"), routing=partial(_softmax_topk, renormalize=True)),
    FamilyAdapter(("jamba",), router_attr="router", routing=partial(_softmax_topk, renormalize=False)),
    # Lara-Mini (not in Transformers 5.17; checked on 5.24): Qwen3-Next's router on float32 logits
    # (input and weight upcast); weights cast to the input dtype.
    FamilyAdapter(("lara_mini",), routing=_softmax_topk, logits="float32"),
    FamilyAdapter(("hunyuan_v1_moe",), routing=_hunyuan, logits="weight", router_linear="wg"),
    FamilyAdapter(
        ("ernie4_5_moe", "ernie4_5_vl_moe_text"),
        routing=_ernie,
        logits="float32",
        correction_bias="moe_statics.e_score_correction_bias",
    ),
    # LongCat-Flash (experts decorated from Transformers 5.25; checked on 5.25): its MoE block routes the
    # zero experts around the experts.
    FamilyAdapter(("longcat_flash",), router_attr="router", routing=_longcat_flash, logits="float32", router_linear="classifier"),
    FamilyAdapter(("deepseek_v2", "deepseek_ocr2_text", "unlimited_ocr_text"), routing=_deepseek_v2, logits="float32"),
    FamilyAdapter(("mistral4",), routing=_mistral4),
    FamilyAdapter(("mistral_large4_text",), routing=partial(_mistral4, renormalize=True, cast="float32"), logits="float32"),
    # Top-k over the logits, then softmax over the k.
    FamilyAdapter(("gpt_oss",), router_attr="router", routing=_topk_logits_softmax, activation=_swiglu_oai("alpha", "limit")),
    FamilyAdapter(
        ("openai_privacy_filter",),
        router_attr="router",
        routing=_privacy_filter,
        activation=_swiglu_oai("alpha", "limit"),
        logits="float32",
    ),
    FamilyAdapter(("aria_text",), router_attr="router", routing=_topk_logits_softmax),
    FamilyAdapter(
        ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"),
        router_attr="router",
        routing=_topk_logits_softmax,
        logits="upcast",
    ),
    FamilyAdapter(("cohere2_moe",), routing=_cohere2),
    # Sigmoid scores with a selection-only correction bias.
    FamilyAdapter(
        (
            "deepseek_v3",
            "deepseek_v32",
            "glm4_moe",
            "glm4_moe_lite",
            "glm4v_moe_text",
            "glm_moe_dsa",
            "dots1",
            "dots3_note_text",
            "exaone_moe",
            "kimi_linear",
            "solar_open",
            "mimo_v2_flash",
            "axk1",
            "minicpm5_moe",  # not in Transformers 5.17; checked on 5.25 (float32 logits with autocast off)
        ),
        routing=_deepseek_v3,
        logits="float32",
    ),
    FamilyAdapter(("bailing_hybrid",), routing=_deepseek_v3, logits="float32", activation=_swiglu_post_clamped),
    FamilyAdapter(("axk2",), routing=_axk2, logits="float32"),
    # HY-V4-VL's text model (not in Transformers 5.17; checked on 5.24) copies HY-V4's router, experts and MoE block.
    FamilyAdapter(
        ("glm5_next_text", "hy_v4", "hy_v4_vl_text"),
        routing=_deepseek_v3,
        logits="float32",
        activation=_swiglu_clamped("swiglu_limit"),
    ),
    # Ungated experts with relu2 (squared ReLU), from their act_fn; a latent projection around the
    # experts (moe_latent_size) stays in the block.
    FamilyAdapter(("nemotron_h",), routing=_deepseek_v3, logits="float32"),
    # Beam's `_apply_gate` is the default act_fn(gate) * up computed in float32 and cast back: the
    # kernels compute it in float32 too.
    FamilyAdapter(("beam",), routing=_deepseek_v3, logits="float32", activation=activation_from_act_fn),
    FamilyAdapter(
        ("afmoe",),
        router_attr="router",
        routing=partial(_sigmoid_biased, renorm_eps=1e-20, scale_attr="route_scale"),
        logits="upcast",
        router_linear="gate",
    ),
    FamilyAdapter(
        ("hy_v3", "dots3_note_vision_encoder"),
        routing=partial(_sigmoid_biased, renorm_eps=1e-20, scale_attr="router_scaling_factor"),
        logits="float32",
    ),
    FamilyAdapter(("minimax_m2",), routing=partial(_sigmoid_biased, renorm_eps=0.0), logits="weight"),
    FamilyAdapter(
        ("minimax_m3_vl_text",),
        routing=partial(_sigmoid_biased, renorm_eps=0.0),
        logits="weight",
        activation=_swiglu_oai("swiglu_alpha", "swiglu_limit"),
    ),
    # Step3p7's text model (model type "step3p5"; not in Transformers 5.17; checked on 5.25): MiniMax-M2's
    # router with the correction bias on the router; Bailing-Hybrid's post-activation clipping.
    FamilyAdapter(
        ("step3p5",),
        routing=partial(_sigmoid_biased, renorm_eps=0.0),
        logits="weight",
        activation=_swiglu_post_clamped,
    ),
    FamilyAdapter(("laguna",), routing=_laguna, logits="upcast"),
    FamilyAdapter(("lfm2_moe",), routing=_lfm2_moe),
    FamilyAdapter(("flint",), routing=_flint, logits="float32"),
    # Routers RoutingSpec can't express: the stock router stays, the experts are fused.
    FamilyAdapter(("phimoe",), router_attr="router"),  # sparsemixer
    FamilyAdapter(("gemma4_text", "diffusion_gemma_text"), router_attr="router"),  # normed input, per-expert scale
    FamilyAdapter(("inkling_text",)),  # also returns the shared experts' gammas
    FamilyAdapter(("zaya",)),  # router MLP with state carried across layers, skip expert
    # Correction bias added to the logits, sigmoid after selection. Kolibri-1.1 (not in Transformers 5.17;
    # checked on 5.25) copies Kolibri-1's router, experts and MoE block.
    FamilyAdapter(("kolibri1", "kolibri1_1")),
    # sqrtsoftplus scores in the model dtype; hash routing (a token-id table) in the first layers.
    FamilyAdapter(("deepseek_v4",), activation=_swiglu_clamped("limit")),
)
