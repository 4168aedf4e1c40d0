"""Sampling a batch of rows: tokens, their processed and raw logprobs, top-k."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import row_uniforms
from .processing import processed_logprobs


@dataclass
class SamplingTensors:
    """Per-row sampling settings for one step, already on the logits' device."""

    temperature: torch.Tensor  # [R] float32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    keys: torch.Tensor  # [R] int64 noise keys
    counters: torch.Tensor  # [R] int64 draw index (output position)
    banned: torch.Tensor | None  # [2, N] int64 (row, token) pairs masked out
    use_sort: bool
    use_min_p: bool
    num_top_logprobs: int


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32, processed (raw for greedy rows)
    raw_logprobs: torch.Tensor  # [R] float32
    top_token_ids: torch.Tensor | None  # [R, k]
    top_logprobs: torch.Tensor | None  # [R, k]


def sample(logits: torch.Tensor, st: SamplingTensors) -> SamplerOutput:
    """Draw one token per row by inverse-CDF on a counter-based uniform."""
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1)
    if st.banned is not None:
        logits = logits.index_put((st.banned[0], st.banned[1]),
                                  torch.tensor(float("-inf"), device=logits.device))
    logp = processed_logprobs(logits, st.temperature, st.top_k, st.top_p, st.min_p,
                              st.use_sort, st.use_min_p)
    greedy = st.temperature == 0
    tokens = torch.where(greedy, logits.argmax(dim=-1), _inverse_cdf(logp, st))
    picked = tokens[:, None]
    token_logp = torch.where(greedy, raw.gather(-1, picked)[:, 0], logp.gather(-1, picked)[:, 0])
    top_ids = top_lp = None
    if st.num_top_logprobs > 0:
        source = torch.where(greedy[:, None], raw, logp)
        top_lp, top_ids = source.topk(st.num_top_logprobs, dim=-1)
    return SamplerOutput(tokens, token_logp, raw.gather(-1, picked)[:, 0], top_ids, top_lp)


def _inverse_cdf(logp: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    cdf = logp.double().exp().cumsum(dim=-1)
    target = row_uniforms(st.keys, st.counters) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    tokens = tokens.clamp(max=logp.shape[-1] - 1)
    # Rounding at the top of the CDF could land on a trailing filtered token.
    landed_outside = logp.gather(-1, tokens[:, None])[:, 0] == float("-inf")
    return torch.where(landed_outside, logp.argmax(dim=-1), tokens)
