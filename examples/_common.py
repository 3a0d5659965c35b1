"""What the examples share: the --model/--device options, loading, prompts. Not part of the library.

--model is a local checkpoint folder or a Hub id of a supported MoE model, or "tiny": a two-layer
qwen3_moe with random weights and a byte-level tokenizer, built in code (no download; its text is
noise, its tokens still compare with stock's). The default is the trained fixture the tests use,
../shared/fixtures/tiny-qwen3-moe beside the repository (or under $HF_MOE_ACCEL_FIXTURES), when it
is there, else "tiny".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

FIXTURES = Path(os.environ.get("HF_MOE_ACCEL_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
FIXTURE = FIXTURES / "tiny-qwen3-moe"
TINY = "tiny"
PROMPTS = ["def parse_header(line):\n    ", "import os\nimport sys\n\nclass "]


def parser(doc: str) -> argparse.ArgumentParser:
    """argparse with the examples' --model and --device; the description is the script's docstring."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(FIXTURE) if FIXTURE.is_dir() else TINY,
                   help=f"checkpoint folder or Hub id, or {TINY!r} (random weights); default: %(default)s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    return p


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (GPT-2's byte-level alphabet) and an end-of-text token 0."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config():
    return AutoConfig.for_model(
        "qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        vocab_size=257, decoder_sparse_step=1, mlp_only_layers=[], initializer_range=0.2, pad_token_id=0, eos_token_id=0,
    )


def load(model: str, device: str, dtype: torch.dtype | None = None, device_map: str | None = None):
    """(model in eval mode, its tokenizer). float32 on CPU, bf16 on a GPU, unless `dtype`; placed on
    `device_map` (default `device`)."""
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    if model == TINY:
        torch.manual_seed(0)  # every process (torchrun ranks too) builds the same weights
        with torch.device(device_map or device):
            return AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype).eval(), tiny_tokenizer()
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device_map or device).eval()
    return loaded, AutoTokenizer.from_pretrained(model)


def inputs(model, tokenizer, prompts: list[str] = PROMPTS) -> dict[str, torch.Tensor]:
    """generate() inputs of `prompts`, left-padded, on the model's device."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {k: v.to(model.device) for k, v in tokenizer(prompts, return_tensors="pt", padding=True).items()}


def divergence(ours: torch.Tensor, stock: torch.Tensor) -> str:
    """Where greedy tokens that differ from stock's first part, for the line after `tokens equal stock: False`."""
    agree = (ours.cpu() == stock.cpu()).int().cumprod(-1).sum(-1).tolist()
    return (f"  each row's first {agree} of {ours.shape[-1]} tokens equal stock's: in bf16 the fused kernels round "
            "differently from stock's, and a greedy near-tie flips (float32 on CPU gives stock's tokens exactly)")
