"""Quality and speed of a model with fewer activated experts, beside the full model's.

For each setting (stock Transformers, accelerated with the model's own top-k, each static top-k,
each expert threshold) on the same weights and text:

- perplexity over the text in non-overlapping windows (256 tokens by default);
- greedy agreement: on prompts cut from the text, stock Transformers generates a greedy
  continuation; the share of those tokens that the setting also picks as its greedy token, given
  the same context (teacher-forced, so one early difference doesn't count against every later token);
- experts per token: the average over tokens and MoE layers of the experts that ran (ids >= 0);
- decode tokens/s of `generate()` (optional): `bench.timing.time_generate`, the bench's own timing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..api import accelerate, unpatch
from ..kernels.spec import is_experts_module
from ..quality.selection import check_expert_selection
from .timing import forced_greedy, time_generate


@dataclass(frozen=True)
class Setting:
    """One way to run the model: stock, or accelerated with optional expert-selection options, or with its
    experts quantized at patch time (`expert_dtype`; the originals are kept and restored)."""

    name: str
    accelerated: bool = True
    top_k: int | None = None
    expert_threshold: float | None = None
    expert_dtype: str | None = None


def sweep_settings(top_ks: Sequence[int] = (), thresholds: Sequence[float] = (),
                   expert_dtype: str | None = None) -> list[Setting]:
    """stock, full (accelerated, the model's own top-k), full with its experts in `expert_dtype` (a row
    named after it), then one setting per top-k and per threshold."""
    for top_k in top_ks:
        check_expert_selection(top_k, None)
    for threshold in thresholds:
        check_expert_selection(None, threshold)
    return [
        Setting("stock", accelerated=False),
        Setting("full"),
        *([Setting(expert_dtype, expert_dtype=expert_dtype)] if expert_dtype else []),
        *(Setting(f"top_k={k}", top_k=k) for k in top_ks),
        *(Setting(f"threshold={t:g}", expert_threshold=t) for t in thresholds),
    ]


@dataclass(frozen=True)
class EvalConfig:
    window: int = 256  # perplexity window (tokens), non-overlapping
    max_tokens: int | None = None  # perplexity over the first this many tokens of the text (None: all)
    batch: int = 8  # windows per forward pass
    prompts: int = 16  # prompts for greedy agreement
    prompt_len: int = 64
    new_tokens: int = 32  # greedy tokens per prompt (agreement) and per sequence (speed)
    speed_batch: int = 0  # batch of the decode-speed measurement; 0: no speed measurement
    speed_repeats: int = 3

    def __post_init__(self) -> None:
        for name in ("window", "batch", "prompts", "prompt_len", "new_tokens", "speed_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.speed_batch < 0:
            raise ValueError(f"speed_batch must be 0 (no speed measurement) or more, got {self.speed_batch}")
        if self.max_tokens is not None and self.max_tokens < self.window:
            raise ValueError(f"max_tokens ({self.max_tokens}) must hold at least one window of {self.window} tokens")


@dataclass(frozen=True)
class EvalData:
    """The tokenised text cut for one evaluation, on the model's device."""

    windows: torch.Tensor  # [n, window] perplexity windows
    prompts: torch.Tensor  # [prompts, prompt_len], evenly spaced through the text


def prepare_data(token_ids: torch.Tensor, config: EvalConfig, device: torch.device) -> EvalData:
    """Windows and prompts from a 1-D tensor of the text's token ids."""
    ids = token_ids[: config.max_tokens] if config.max_tokens else token_ids
    num_windows = ids.numel() // config.window
    if num_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {config.window}")
    if token_ids.numel() < config.prompt_len:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one prompt of {config.prompt_len}")
    starts = torch.linspace(0, token_ids.numel() - config.prompt_len, config.prompts).long()
    prompts = torch.stack([token_ids[s : s + config.prompt_len] for s in starts.tolist()])
    windows = ids[: num_windows * config.window].view(num_windows, config.window)
    return EvalData(windows=windows.to(device), prompts=prompts.to(device))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int, progress: bool = False) -> float:
    """exp(mean next-token negative log-likelihood) over each window's tokens after its first."""
    total_nll = torch.zeros((), dtype=torch.float64, device=windows.device)
    for chunk in tqdm(windows.split(batch), desc="perplexity", unit="batch", leave=False, disable=not progress):
        logits = model(chunk).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.double()
    return torch.exp(total_nll / (windows.shape[0] * (windows.shape[1] - 1))).item()


@torch.no_grad()
def greedy_agreement(model: nn.Module, sequences: torch.Tensor, prompt_len: int) -> float:
    """Share of the tokens after `prompt_len` in `sequences` that are `model`'s greedy next token."""
    logits = model(sequences[:, :-1]).logits[:, prompt_len - 1 :]
    return (logits.argmax(dim=-1) == sequences[:, prompt_len:]).float().mean().item()


class ExpertCounter:
    """Counts the experts that run (ids >= 0) per (token, MoE layer) while installed."""

    def __init__(self) -> None:
        self.experts: torch.Tensor | int = 0  # summed on the device: no sync per layer
        self.token_layers = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.experts = self.experts + (ids >= 0).sum()
        self.token_layers += ids.shape[0]

    @property
    def per_token(self) -> float:
        return float(self.experts) / self.token_layers if self.token_layers else float("nan")

    @contextlib.contextmanager
    def installed(self, model: nn.Module) -> Iterator[ExpertCounter]:
        handles = [
            m.register_forward_pre_hook(self, with_kwargs=True) for m in model.modules() if is_experts_module(m)
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def applied(model: nn.Module, setting: Setting) -> Iterator[nn.Module]:
    """The model run as `setting` says, put back to stock afterwards."""
    if not setting.accelerated:
        yield model
        return
    quantized = {"expert_dtype": setting.expert_dtype, "keep_original_experts": True} if setting.expert_dtype else {}
    accelerate(model, top_k=setting.top_k, expert_threshold=setting.expert_threshold, **quantized)
    try:
        yield model
    finally:
        unpatch(model)


def evaluate(model: nn.Module, token_ids: torch.Tensor, settings: Sequence[Setting], config: EvalConfig = EvalConfig(),
             progress: bool = True) -> dict:
    """Measure every setting on `token_ids` (the text, 1-D); returns a JSON-ready dict.

    The model must be a stock (not accelerated) Transformers MoE model in eval mode; it is left stock.
    """
    device = next(model.parameters()).device
    for setting in settings:  # bad options (a top-k above the experts...) raise before the long work
        with applied(model, setting):
            pass
    data = prepare_data(token_ids, config, device)
    reference = forced_greedy(model, data.prompts, config.new_tokens)  # stock greedy tokens
    speed_prompts = data.prompts.repeat(-(-config.speed_batch // config.prompts), 1)[: config.speed_batch]
    rows = []
    for setting in tqdm(settings, desc="settings", unit="setting", disable=not progress):
        with applied(model, setting):
            with ExpertCounter().installed(model) as counter:
                ppl = perplexity(model, data.windows, config.batch, progress)
            row = {
                **asdict(setting),
                "ppl": ppl,
                "agreement": greedy_agreement(model, reference, config.prompt_len),
                "experts_per_token": counter.per_token,
            }
            if config.speed_batch:
                timing = time_generate(model, speed_prompts, config.new_tokens, config.speed_repeats)
                row["decode_tokens_per_s"] = timing.decode_tokens_per_s
        rows.append(row)
    _add_relative_figures(rows)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "ppl_tokens": data.windows.numel(),
        **asdict(config),
        "settings": rows,
    }


def _add_relative_figures(rows: list[dict]) -> None:
    full = next((r for r in rows if r["name"] == "full"), rows[0])
    for row in rows:
        add_relative_figures(row, full)


def add_relative_figures(row: dict, full: dict) -> None:
    """ppl change, share of the model's experts, speed against the accelerated full model's row."""
    row["ppl_change_pct"] = 100 * (row["ppl"] / full["ppl"] - 1)
    row["experts_fraction"] = row["experts_per_token"] / full["experts_per_token"]
    if "decode_tokens_per_s" in row:
        row["speed_vs_full"] = row["decode_tokens_per_s"] / full["decode_tokens_per_s"]
