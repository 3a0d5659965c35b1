"""Cheaper stand-ins for Transformers' logits processors that cost host time at every decode step.

Once the decode step is one graph replay, generate()'s own host work between replays sets the pace
of a small model at batch 1. With an EOS token and a minimum length (`min_length`, `min_new_tokens`,
as the benchmark protocol's forced-length decode sets), generate() runs MinLengthLogitsProcessor and
MinNewTokensLengthLogitsProcessor every step, and each rebuilds an EOS mask over the whole vocabulary
(arange, isin, clone, where: several launches a step). The stand-in computes the same scores with the
mask made once per call: one launch a step (a masked fill below the length, a clone from there on, as
the originals return a new tensor). It replaces only instances of exactly those two classes, inside the
calls we serve. The host work a step with the stand-ins: `python scripts/profile_host_step.py --family
olmoe` (`--no-eos`: with no length processors at all); the whole step: `python scripts/profile_decode_step.py`
(figures: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)


class EosBelowLengthProcessor(LogitsProcessor):
    """EOS scores set to -inf while a sequence is shorter than `min_length` tokens (prompt included): what
    MinLengthLogitsProcessor and MinNewTokensLengthLogitsProcessor compute, bit for bit, as a new tensor."""

    def __init__(self, eos_token_id: torch.Tensor, min_length: int):
        self.eos_token_id = eos_token_id
        self.min_length = min_length
        self._eos_mask: torch.Tensor | None = None  # [vocabulary] bool, made at the first step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] >= self.min_length:
            return scores.clone()
        mask = self._eos_mask
        if mask is None or mask.shape[0] != scores.shape[-1] or mask.device != scores.device:
            vocabulary = torch.arange(scores.shape[-1], device=scores.device)
            mask = self._eos_mask = torch.isin(vocabulary, self.eos_token_id.to(scores.device))
        return scores.masked_fill(mask, -math.inf)


def stand_in_for(processor: LogitsProcessor) -> LogitsProcessor:
    """`processor`'s stand-in where it is exactly a MinLengthLogitsProcessor or a MinNewTokensLengthLogitsProcessor
    (a subclass may do more than its parent: kept), else `processor` itself."""
    if type(processor) is MinLengthLogitsProcessor:
        return EosBelowLengthProcessor(processor.eos_token_id, processor.min_length)
    if type(processor) is MinNewTokensLengthLogitsProcessor:
        return EosBelowLengthProcessor(processor.eos_token_id, processor.prompt_length_to_skip + processor.min_new_tokens)
    return processor


def with_stand_ins(processors: LogitsProcessorList) -> LogitsProcessorList:
    """The same list, in the same order, with each processor that has a stand-in replaced by it."""
    return LogitsProcessorList(stand_in_for(processor) for processor in processors)
