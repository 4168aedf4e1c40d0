"""Sampling a batch of rows: tokens, their processed and raw logprobs, top-k."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .processing import processed_logprobs


@dataclass
class SamplingTensors:
    """Per-row sampling settings for one step, already on the logits' device."""

    temperature: torch.Tensor  # [R] float32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, 0 = off
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    uniforms: torch.Tensor  # [R] float64 in (0, 1): each row's draw, see noise.py
    banned: torch.Tensor | None  # [2, N] int64 (row, token) pairs masked out
    use_sort: bool
    use_min_p: bool
    num_top_logprobs: int
    all_greedy: bool
    any_greedy: bool
    need_raw: bool  # some row is greedy or asked for raw logprobs
    fused_kernel: bool = False  # the Triton fused pass may serve rows without top-k/top-p


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32, processed (raw for greedy rows)
    raw_logprobs: torch.Tensor | None  # [R] float32, when need_raw
    top_token_ids: torch.Tensor | None  # [R, k]
    top_logprobs: torch.Tensor | None  # [R, k]
    # [2 or 3, R] float64: token ids, logprobs[, raw logprobs] (packed fused samples only)
    packed: torch.Tensor | None = None


def sample(logits: torch.Tensor, st: SamplingTensors, packed: bool = False) -> SamplerOutput:
    """Draw one token per row by inverse-CDF on the row's own uniform. packed: where the
    fused kernel serves the rows it also writes SamplerOutput.packed (then logprobs and
    raw_logprobs are its float64 rows), one tensor to copy to the host."""
    if st.fused_kernel and not st.use_sort and st.num_top_logprobs == 0:
        return _fused(logits, st, packed)
    logits = logits.float()
    raw = torch.log_softmax(logits, dim=-1) if st.need_raw else None
    if st.banned is not None:
        logits = logits.clone()
        logits[st.banned[0], st.banned[1]] = float("-inf")  # a host scalar: no copy, no sync
    if st.all_greedy:
        tokens = logits.argmax(dim=-1)
        return _output(tokens, raw, raw, st)
    logp = processed_logprobs(logits, st.temperature, st.top_k, st.top_p, st.min_p,
                              st.use_sort, st.use_min_p)
    tokens = inverse_cdf(logp, st.uniforms)
    if st.any_greedy:
        greedy = (st.temperature == 0)[:, None]
        tokens = torch.where(greedy[:, 0], logits.argmax(dim=-1), tokens)
        logp = torch.where(greedy, raw, logp)  # greedy rows report the plain log-softmax
    return _output(tokens, logp, raw, st)


def greedy_pick(logits: torch.Tensor, fused_settings: tuple[torch.Tensor, torch.Tensor] | None
                = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row the argmax (the first index among ties) and its log-softmax value, float32.

    fused_settings: (float32 zeros, float64 uniforms in (0, 1)), each at least [R], to
    run the fused Triton pass (two launches over chunks of the row, reading the logits in
    their own dtype) instead of a float32 copy, a log-softmax and an argmax."""
    if fused_settings is None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    from ..kernels.triton.sampling import fused_sample
    zeros, uniforms = (t[:logits.shape[0]] for t in fused_settings)
    tokens, logprobs, _ = fused_sample(logits, zeros, zeros, uniforms, None, False,
                                       use_min_p=False)
    return tokens, logprobs


def _output(tokens: torch.Tensor, logp: torch.Tensor, raw: torch.Tensor | None,
            st: SamplingTensors) -> SamplerOutput:
    picked = tokens[:, None]
    top_ids = top_lp = None
    if st.num_top_logprobs > 0:
        top_lp, top_ids = logp.topk(st.num_top_logprobs, dim=-1)
    raw_lp = raw.gather(-1, picked)[:, 0] if raw is not None else None
    return SamplerOutput(tokens, logp.gather(-1, picked)[:, 0], raw_lp, top_ids, top_lp)


def inverse_cdf(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds each row's uniform."""
    cdf = logp.double().exp().cumsum(dim=-1)
    target = uniforms * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    tokens = tokens.clamp(max=logp.shape[-1] - 1)
    # Rounding at the top of the CDF could land on a trailing filtered token.
    landed_outside = logp.gather(-1, tokens[:, None])[:, 0] == float("-inf")
    return torch.where(landed_outside, logp.argmax(dim=-1), tokens)


def _fused(logits: torch.Tensor, st: SamplingTensors, packed: bool) -> SamplerOutput:
    """The same draw in one streaming Triton pass (imported late: it compiles on import)."""
    from ..kernels.triton.sampling import fused_sample
    out = None
    if packed:
        out = torch.empty((3 if st.need_raw else 2, logits.shape[0]), dtype=torch.float64,
                          device=logits.device)
    tokens, logp, raw = fused_sample(logits, st.temperature, st.min_p, st.uniforms, st.banned,
                                     st.need_raw, use_min_p=st.use_min_p, out=out)
    return SamplerOutput(tokens, logp, raw, None, None, out)
