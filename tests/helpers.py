"""Shared test utilities: loading fixtures, perplexity, state snapshots."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_fixture(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def heldout_perplexity(model, tokenizer, path: Path, max_tokens: int, window: int = 256, batch: int = 16) -> float:
    """Perplexity over the first `max_tokens` tokens of heldout.txt, in non-overlapping windows."""
    ids = tokenizer((path / "heldout.txt").read_text(), return_tensors="pt").input_ids[0][:max_tokens]
    windows = ids[: len(ids) // window * window].view(-1, window).to(model.device)
    total_nll, total_tokens = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk[:, 1:].numel()
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def module_classes(model) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def two_layer_preset(preset: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Two layers of a real-shape preset (costmodel/presets.py), random weights drawn from seed 0."""
    from hf_moe_accel.costmodel.presets import PRESETS

    config = PRESETS[preset]()
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
