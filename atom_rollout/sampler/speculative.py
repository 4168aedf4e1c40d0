"""Exact speculative verification: rejection sampling on processed distributions.

Given a draft's k proposed tokens with their draft distributions q_1..q_k and the
target's distributions p_1..p_{k+1} at the same positions (both already processed
identically: temperature, top-k, top-p, min-p), accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection emit a token drawn from
normalize(max(0, p_i - q_i)); if all k are accepted emit a bonus token drawn from
p_{k+1}. The emitted sequence is distributed exactly as sampling from the target.
Greedy rows accept a draft iff it is the target argmax and emit the argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyOutput:
    token_ids: torch.Tensor  # [R, k + 1] int64, -1 after the last emitted token
    logprobs: torch.Tensor  # [R, k + 1] float32: the target's logprob of each emitted token
    num_emitted: torch.Tensor  # [R] int64 in [1, k + 1]
    num_accepted: torch.Tensor  # [R] int64 in [0, k] drafts accepted


def verify(target_logp: torch.Tensor, draft_logp: torch.Tensor | None,
           draft_tokens: torch.Tensor, accept_uniforms: torch.Tensor | None,
           final_uniforms: torch.Tensor | None, greedy: torch.Tensor,
           all_greedy: bool = False, any_greedy: bool = True,
           fused: bool = False) -> VerifyOutput:
    """target_logp [R, k+1, V] and draft_logp [R, k, V] processed log-probabilities;
    draft_tokens [R, k]; accept_uniforms [R, k] and final_uniforms [R] in (0, 1), one
    independent draw each; greedy [R] bool. Host flags: all_greedy (every row is greedy)
    skips the sampled rows' work, draft_logp and the uniforms may then be None;
    any_greedy=False (no row is) skips the target argmax; fused runs the sampled rows'
    verification as two Triton launches (kernels/triton/speculative_verify.py)."""
    rows, k = draft_tokens.shape
    # [R, k + 1]; the fused pass reads it for greedy rows only
    need_argmax = all_greedy or any_greedy or not fused
    target_argmax = target_logp.argmax(dim=-1) if need_argmax else None
    if all_greedy:
        argmax_logp = target_logp.gather(-1, target_argmax[..., None])[..., 0].float()
        return greedy_verify(target_argmax, argmax_logp, draft_tokens)
    if fused:
        from ..kernels.triton.speculative_verify import fused_verify
        tokens, logprobs, num_accepted = fused_verify(
            target_logp, draft_logp, draft_tokens, accept_uniforms, final_uniforms, greedy,
            target_argmax)
        return VerifyOutput(tokens, logprobs, num_accepted + 1, num_accepted)
    p_draft = target_logp[:, :k].gather(-1, draft_tokens[..., None])[..., 0].double().exp()
    q_draft = draft_logp.gather(-1, draft_tokens[..., None])[..., 0].double().exp()
    accepted = torch.where(greedy[:, None], draft_tokens == target_argmax[:, :k],
                           accept_uniforms * q_draft < p_draft)
    num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # leading run of accepts
    final = _final_token(target_logp, draft_logp, num_accepted, final_uniforms, greedy,
                         target_argmax)
    positions = torch.arange(k + 1, device=draft_tokens.device)
    padded_drafts = torch.cat([draft_tokens, draft_tokens.new_full((rows, 1), -1)], dim=1)
    tokens = torch.where(positions < num_accepted[:, None], padded_drafts, -1)
    tokens = tokens.scatter(1, num_accepted[:, None], final[:, None])
    logprobs = target_logp.gather(-1, tokens.clamp(min=0)[..., None])[..., 0].float()
    emitted = positions <= num_accepted[:, None]
    return VerifyOutput(tokens, logprobs.masked_fill(~emitted, 0.0), num_accepted + 1,
                        num_accepted)


def greedy_verify(target_tokens: torch.Tensor, target_logprobs: torch.Tensor,
                  draft_tokens: torch.Tensor) -> VerifyOutput:
    """Verification when every row is greedy, from the target's argmax [R, k + 1] and its
    logprob [R, k + 1] at each position: a draft is accepted iff it is the argmax, and
    every emitted token (accepted drafts, then the argmax after them) is the argmax."""
    k = draft_tokens.shape[1]
    accepted = draft_tokens == target_tokens[:, :k]
    num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # leading run of accepts
    positions = torch.arange(k + 1, device=draft_tokens.device)
    emitted = positions <= num_accepted[:, None]
    return VerifyOutput(torch.where(emitted, target_tokens, -1),
                        target_logprobs.float().masked_fill(~emitted, 0.0), num_accepted + 1,
                        num_accepted)


def _final_token(target_logp, draft_logp, num_accepted, uniforms, greedy, target_argmax):
    """The token after the accepted run: residual sample at a rejection, bonus otherwise."""
    k = draft_logp.shape[1]
    index = num_accepted[:, None, None].expand(-1, 1, target_logp.shape[-1])
    p = target_logp.gather(1, index)[:, 0].exp()
    q = draft_logp.gather(1, index.clamp(max=k - 1))[:, 0].exp()
    rejected = (num_accepted < k)[:, None]
    residual = torch.where(rejected, (p - q).clamp(min=0), p)
    # p == q everywhere makes a rejection impossible; the guard only keeps rounding sane.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    token = blocked_inverse_cdf(residual, uniforms)
    return torch.where(greedy, target_argmax.gather(1, num_accepted[:, None])[:, 0], token)


def blocked_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor,
                        block: int = 1024) -> torch.Tensor:
    """Per row, the first token whose cumulative weight exceeds uniform * total weight.

    weights [R, V] non-negative, unnormalised (float32 is enough: sums are float64);
    uniforms [R] float64 in (0, 1). Two levels instead of a float64 scan over the
    whole vocabulary: block sums, their cumulative sum, then the scan of one block.
    A token of zero weight is never returned unless the row has no weight at all."""
    rows, vocab = weights.shape
    padded = weights if vocab % block == 0 else \
        torch.nn.functional.pad(weights, (0, -vocab % block))
    blocks = padded.view(rows, -1, block)
    sums = blocks.sum(dim=-1, dtype=torch.float64)  # [R, blocks]
    cdf = sums.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None]
    chosen = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # [R, 1]
    before = cdf.gather(1, chosen) - sums.gather(1, chosen)
    inner = blocks[torch.arange(rows, device=weights.device), chosen[:, 0]].double()
    inner = inner.cumsum(dim=-1) + before  # [R, block]
    offset = torch.searchsorted(inner, target, right=True).clamp(max=block - 1)
    token = (chosen * block + offset)[:, 0].clamp(max=vocab - 1)
    # Rounding at a block's or the row's end could land on a zero-weight token.
    landed_outside = weights.gather(1, token[:, None])[:, 0] == 0
    return torch.where(landed_outside, weights.argmax(dim=-1), token)
