"""Transformers' MXFP4 gpt-oss experts (`Mxfp4GptOssExperts`), served by the fused kernels.

Transformers' Mxfp4 quantizer has two cases. Where the hub kernels load (`kernels` installed, a GPU it
accepts), it replaces each `GptOssMLP` by an `Mxfp4GptOssMLP` holding `Mxfp4GptOssExperts`, whose
gate_up_proj/down_proj are the hub's triton tensors (packed e2m1 values in a GPU-specific swizzled
layout) with e8m0 scales in `<proj>_precision_config.weight_scale`, and float32 biases. Neither class
dispatches through an experts interface, so this module swaps their forwards (patches/swap.py):
the block routes with its router and calls the experts with (top-k ids, weights); the experts run
`kernels.fused_experts` on the weights in `spec.MxScales`' plain layout. Otherwise Transformers
dequantizes at load: the model is a bf16 gpt-oss, served as such (`PatchReport.mxfp4_dequantized`).

Reading the weights: the swizzled tensors are read back the way Transformers' own reverse op
(`Mxfp4ReverseDeserialize`, used by save_pretrained) does, `layout.unswizzle_data(...)`, once at patch
time; the plain tensors replace the swizzled ones on the module (so the experts' memory is not
doubled), and `unpatch` swizzles them again through Transformers' loader (`swizzle_mxfp4_convertops`),
giving the stock module back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..kernels.experts_mxfp4_reference import MX_GROUP
from ..kernels.spec import Activation, ExpertWeights, MxScales
from .swap import STATE_ATTR, swap_forward

PROJECTIONS = ("gate_up_proj", "down_proj")
FORMAT = "MXFP4 (packed e2m1 values, e8m0 scales per 32 values)"
LAYOUT_FIX = (
    "To accelerate this model, load it dequantized (from_pretrained(..., quantization_config=Mxfp4Config("
    "dequantize=True))): its experts are then bf16 and served as such; or run it stock"
)


def _mxfp4_module() -> object | None:
    """transformers.integrations.mxfp4 where it is loaded (MXFP4 experts exist only then)."""
    return sys.modules.get("transformers.integrations.mxfp4")


def is_mxfp4_experts(module: nn.Module) -> bool:
    integration = _mxfp4_module()
    cls = getattr(integration, "Mxfp4GptOssExperts", None)
    return cls is not None and isinstance(module, cls)


def is_mxfp4_block(module: nn.Module) -> bool:
    integration = _mxfp4_module()
    cls = getattr(integration, "Mxfp4GptOssMLP", None)
    return cls is not None and isinstance(module, cls)


def has_mxfp4_experts(model: nn.Module) -> bool:
    """Whether any experts module of `model` is Transformers' MXFP4 gpt-oss experts."""
    return any(is_mxfp4_experts(m) for m in model.modules())


def mxfp4_dequantized_at_load(model: nn.Module) -> bool:
    """Whether `model` was loaded with an MXFP4 quantization config that Transformers dequantized (no
    hub kernels, or `dequantize=True`): no MXFP4 experts module is left."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return method == "mxfp4" and not any(is_mxfp4_experts(m) for m in model.modules())


def _read_packed(experts: nn.Module, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [E, N, K // 2], scales [E, N, K // 32]) uint8, as Transformers' reverse op reads them."""
    weight = getattr(experts, proj)
    scales = getattr(experts, f"{proj}_precision_config").weight_scale
    blocks = weight.storage.layout.unswizzle_data(weight.storage.data).transpose(-1, -2)
    scales = scales.storage.layout.unswizzle_data(scales.storage.data).transpose(-1, -2)
    return blocks.reshape(*scales.shape[:2], -1).contiguous(), scales.contiguous()


def layout_problem(experts: nn.Module) -> str | None:
    """What of this Mxfp4GptOssExperts' storage the kernels can't read, or None; reads nothing big."""
    sizes = {"hidden_size": experts.hidden_size, "intermediate_size": experts.intermediate_size}
    for name, size in sizes.items():
        if size % MX_GROUP:
            return f"its {name} {size} is not a multiple of {MX_GROUP} (one e8m0 scale per {MX_GROUP} values)"
    for proj in PROJECTIONS:
        weight = getattr(experts, proj, None)
        config = getattr(experts, f"{proj}_precision_config", None)
        scale = getattr(config, "weight_scale", None)
        storage, scale_storage = getattr(weight, "storage", None), getattr(scale, "storage", None)
        if not all(hasattr(s, "layout") and isinstance(getattr(s, "data", None), torch.Tensor)
                   for s in (storage, scale_storage)):
            return (f"its {proj} is not the hub kernels' packed tensor with a precision config "
                    f"(got {type(weight).__name__}); it was not loaded through Transformers' MXFP4 loader")
        if not hasattr(storage.layout, "unswizzle_data") or not hasattr(scale_storage.layout, "unswizzle_data"):
            return f"its {proj} layout {type(storage.layout).__name__} can't be read back (no unswizzle_data)"
        if storage.data.dtype != torch.uint8 or scale_storage.data.dtype != torch.uint8:
            return f"its {proj} stores {storage.data.dtype} values and {scale_storage.data.dtype} scales, not uint8"
    for proj in PROJECTIONS:
        bias = getattr(experts, f"{proj}_bias", None)
        if not isinstance(bias, torch.Tensor):
            return f"it has no {proj}_bias"
    return None


def activation(experts: nn.Module) -> Activation:
    """gpt-oss's clamped SwiGLU with the module's alpha and limit (the hub's fused swiglu reads them)."""
    return Activation("swiglu_oai", alpha=float(experts.alpha), limit=float(experts.limit))


@dataclass
class Mxfp4State:
    """What a patched Mxfp4GptOssExperts keeps in its `__dict__` (STATE_ATTR)."""

    weights: ExpertWeights  # plain MXFP4 layout; its tensors are also the module's gate_up_proj/down_proj
    rebuild: Callable[[nn.Module], None]  # puts the stock (swizzled) tensors back

    def __reduce_ex__(self, protocol: int) -> tuple:
        return type(None), ()  # never pickled with the module (patches/swap.py writes the stock class)


def _experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Mxfp4GptOssExperts' forward in the fused kernels (the reference off the GPU); no backward."""
    state: Mxfp4State = getattr(self, STATE_ATTR)
    with torch.no_grad():
        return kernels.fused_experts(hidden_states, state.weights, top_k_index, top_k_weights)


def _block_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mxfp4GptOssMLP's routing (its expert-parallel branch: the router's top-k and scores, the same rule
    as the hub's routing) in front of the patched experts; returns (output, router logits) as stock."""
    batch_size = hidden_states.shape[0]
    hidden_states = hidden_states.reshape(-1, self.router.hidden_dim)
    router_logits, router_scores, router_indices = self.router(hidden_states)
    routed_out = self.experts(hidden_states, router_indices, router_scores)
    return routed_out.reshape(batch_size, -1, self.router.hidden_dim), router_logits


def _reswizzle(experts: nn.Module) -> None:
    """The stock tensors again, through Transformers' loader from the checkpoint's layout."""
    integration = _mxfp4_module()
    state: Mxfp4State = experts.__dict__[STATE_ATTR]
    hub = getattr(integration, "triton_kernels_hub", None)
    if hub is None:
        raise RuntimeError("unpatch: Transformers' MXFP4 hub kernels are not loaded, so the experts can't be swizzled back")
    for proj, blocks, scales in (("gate_up_proj", state.weights.gate_up, state.weights.mx_scales.gate_up),
                                 ("down_proj", state.weights.down, state.weights.mx_scales.down)):
        checkpoint_blocks = blocks.reshape(*scales.shape, MX_GROUP // 2)  # [E, N, G, 16], as stored on disk
        integration.swizzle_mxfp4_convertops(checkpoint_blocks, scales, experts, proj, blocks.device, hub)


def patch(experts: nn.Module, block: nn.Module | None, act: Activation) -> None:
    """Read the packed weights into the plain layout, swap the forwards; `layout_problem` must be None."""
    packed = {proj: _read_packed(experts, proj) for proj in PROJECTIONS}  # all reads before any change
    weights = ExpertWeights(
        gate_up=packed["gate_up_proj"][0], down=packed["down_proj"][0],
        gate_up_bias=experts.gate_up_proj_bias, down_bias=experts.down_proj_bias,
        transposed=False, interleaved=True, has_gate=True, activation=act,
        mx_scales=MxScales(packed["gate_up_proj"][1], packed["down_proj"][1]),
    )
    for proj in PROJECTIONS:  # the plain tensors replace the swizzled ones: no second copy stays
        object.__setattr__(experts, proj, packed[proj][0])
        object.__setattr__(experts, f"{proj}_precision_config", None)
    swap_forward(experts, _experts_forward, Mxfp4State(weights, _reswizzle))
    if block is not None and is_mxfp4_block(block):
        swap_forward(block, _block_forward, None)


def unpatch(experts: nn.Module) -> None:
    """Put the stock tensors back (the class is restored by the caller, with the other swaps)."""
    experts.__dict__[STATE_ATTR].rebuild(experts)
