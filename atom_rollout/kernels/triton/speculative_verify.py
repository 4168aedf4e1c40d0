"""Exact speculative verification of sampled rows in two launches (the math of
sampler/speculative.verify, which stays the reference and the torch backend's path).

1. ``_residual_chunk_kernel`` (grid rows x chunks): every program first finds its
   row's accepted run (k draft tokens, each accepted when u * q(d) < p(d), greedy rows
   when d is the target argmax; a handful of scalar loads), then reads one chunk of
   the target's and the draft's processed log-probs at the first rejected position and
   writes the chunk's float64 sums of max(0, p - q) (the residual) and of p (the bonus
   distribution, and the residual's fallback when rounding leaves it empty).
2. ``_residual_pick_kernel`` (one program per row) takes the float64 cumulative sum of
   the chunk sums, finds the chunk where ``uniform * total`` lands, scans that chunk for
   the token (the same per-token fp32 weights as step 1) and writes the emitted tokens
   (accepted drafts, then that token, then -1), their target logprobs and the count.

Per-token weights are fp32 as in the torch path, sums and scans float64. Grid sizes
depend only on shapes: no host syncs, graph-capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sampling import choose_block, landing_chunk

_RESIDUAL = tl.constexpr(0)  # fields of the [R, 2, chunks] partials
_BONUS = tl.constexpr(1)


@triton.jit
def _accepted_run(row, target_ptr, draft_ptr, drafts_ptr, accept_u_ptr, greedy_ptr,
                  argmax_ptr, t_stride0, t_stride1, d_stride0, d_stride1,
                  K: tl.constexpr, HAS_GREEDY: tl.constexpr):
    """How many of the row's k drafts lead the emitted tokens (the leading run of accepts)."""
    run = 1
    count = 0
    greedy = 0
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + row).to(tl.int32)
    for i in tl.static_range(K):
        token = tl.load(drafts_ptr + row * K + i)
        log_p = tl.load(target_ptr + row * t_stride0 + i * t_stride1 + token)
        log_q = tl.load(draft_ptr + row * d_stride0 + i * d_stride1 + token)
        u = tl.load(accept_u_ptr + row * K + i)
        ok = u * tl.exp(log_q.to(tl.float64)) < tl.exp(log_p.to(tl.float64))
        if HAS_GREEDY:
            is_argmax = token == tl.load(argmax_ptr + row * (K + 1) + i)
            ok = tl.where(greedy != 0, is_argmax, ok)
        run = run * ok.to(tl.int32)
        count += run
    return count


@triton.jit
def _chunk_weights(row, accepted, cols, vocab, target_ptr, draft_ptr, t_stride0, t_stride1,
                   d_stride0, d_stride1, K: tl.constexpr):
    """fp32 (residual, p) of one chunk at the position after the accepted run; at the
    bonus position (all k accepted) the residual is p itself."""
    inside = cols < vocab
    log_p = tl.load(target_ptr + row * t_stride0 + accepted * t_stride1 + cols, mask=inside,
                    other=float("-inf"))
    p = tl.exp(log_p)
    rejected = accepted < K
    draft_row = tl.minimum(accepted, K - 1)
    log_q = tl.load(draft_ptr + row * d_stride0 + draft_row * d_stride1 + cols,
                    mask=inside & (cols * 0 + accepted < K), other=float("-inf"))
    residual = tl.where(rejected, tl.maximum(p - tl.exp(log_q), 0.0), p)
    return residual, p


@triton.jit
def _residual_chunk_kernel(part_ptr, count_ptr, target_ptr, draft_ptr, drafts_ptr,
                           accept_u_ptr, greedy_ptr, argmax_ptr, vocab, num_chunks,
                           t_stride0, t_stride1, d_stride0, d_stride1, K: tl.constexpr,
                           HAS_GREEDY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    accepted = _accepted_run(row, target_ptr, draft_ptr, drafts_ptr, accept_u_ptr, greedy_ptr,
                             argmax_ptr, t_stride0, t_stride1, d_stride0, d_stride1, K,
                             HAS_GREEDY)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    residual, p = _chunk_weights(row, accepted, cols, vocab, target_ptr, draft_ptr, t_stride0,
                                 t_stride1, d_stride0, d_stride1, K)
    part = part_ptr + row * 2 * num_chunks + chunk
    tl.store(part + _RESIDUAL * num_chunks, tl.sum(residual.to(tl.float64), 0))
    tl.store(part + _BONUS * num_chunks, tl.sum(p.to(tl.float64), 0))
    if chunk == 0:
        tl.store(count_ptr + row, accepted.to(tl.int64))


@triton.jit
def _residual_pick_kernel(token_ptr, logprob_ptr, count_ptr, part_ptr, target_ptr, draft_ptr,
                          drafts_ptr, final_u_ptr, greedy_ptr, argmax_ptr, vocab, num_chunks,
                          t_stride0, t_stride1, d_stride0, d_stride1, K: tl.constexpr,
                          HAS_GREEDY: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    accepted = tl.load(count_ptr + row)
    offs = tl.arange(0, CHUNKS_PAD)
    valid = offs < num_chunks
    part = part_ptr + row * 2 * num_chunks
    residual_mass = tl.load(part + _RESIDUAL * num_chunks + offs, mask=valid, other=0.0)
    bonus_mass = tl.load(part + _BONUS * num_chunks + offs, mask=valid, other=0.0)
    # p == q everywhere makes a rejection impossible; the fallback only keeps rounding sane.
    use_p = (accepted == K) | (tl.sum(residual_mass, 0) <= 0)
    mass = tl.where(use_p, bonus_mass, residual_mass)
    chunk, before, target, _ = landing_chunk(mass, valid, offs, tl.load(final_u_ptr + row))

    idx = tl.arange(0, BLOCK)
    residual, p = _chunk_weights(row, accepted, chunk * BLOCK + idx, vocab, target_ptr,
                                 draft_ptr, t_stride0, t_stride1, d_stride0, d_stride1, K)
    weight = tl.where(use_p, p, residual)
    token_cdf = tl.cumsum(weight.to(tl.float64), 0)
    first = tl.sum((token_cdf <= target - before).to(tl.int32), 0)
    # fp64 rounding can leave the target just past this chunk's last token of weight
    last = tl.max(tl.where(weight > 0, idx, -1), 0)
    final = (chunk * BLOCK + tl.where(first < BLOCK, first, last)).to(tl.int64)
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + row) != 0
        final = tl.where(greedy, tl.load(argmax_ptr + row * (K + 1) + accepted), final)
    _write_emitted(row, accepted, final, token_ptr, logprob_ptr, target_ptr, drafts_ptr,
                   t_stride0, t_stride1, K)


@triton.jit
def _write_emitted(row, accepted, final, token_ptr, logprob_ptr, target_ptr, drafts_ptr,
                   t_stride0, t_stride1, K: tl.constexpr):
    """Accepted drafts, then the final token, then -1; the target's logprob of each (0
    past the end)."""
    for i in tl.static_range(K + 1):
        if i < K:
            draft = tl.load(drafts_ptr + row * K + i)
        else:
            draft = final
        token = tl.where(i < accepted, draft, tl.where(i == accepted, final, -1))
        emitted = i <= accepted
        log_p = tl.load(target_ptr + row * t_stride0 + i * t_stride1 + tl.maximum(token, 0))
        tl.store(token_ptr + row * (K + 1) + i, token)
        tl.store(logprob_ptr + row * (K + 1) + i, tl.where(emitted, log_p, 0.0))


def fused_verify(target_logp: torch.Tensor, draft_logp: torch.Tensor,
                 draft_tokens: torch.Tensor, accept_uniforms: torch.Tensor,
                 final_uniforms: torch.Tensor, greedy: torch.Tensor,
                 target_argmax: torch.Tensor | None, block: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [R, k + 1] int64, -1 past the last emitted; their target logprobs [R, k + 1]
    fp32, 0 past it; drafts accepted [R] int64). target_logp [R, k + 1, V] and draft_logp
    [R, k, V] fp32 processed log-probs, draft_tokens [R, k], accept_uniforms [R, k] and
    final_uniforms [R] float64, greedy [R] bool; target_argmax [R, k + 1] is needed only
    when some row is greedy (None: no row is)."""
    rows, k = draft_tokens.shape
    vocab, device = target_logp.shape[-1], target_logp.device
    tokens = torch.empty(rows, k + 1, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, k + 1, dtype=torch.float32, device=device)
    accepted = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return tokens, logprobs, accepted
    target_logp, draft_logp = _unit_stride(target_logp), _unit_stride(draft_logp)
    block = block or choose_block(rows, vocab, device)
    num_chunks = triton.cdiv(vocab, block)
    part = torch.empty(rows, 2, num_chunks, dtype=torch.float64, device=device)
    has_greedy = target_argmax is not None
    argmax = target_argmax.contiguous() if has_greedy else accepted  # unread placeholder
    drafts = draft_tokens.contiguous()
    strides = (target_logp.stride(0), target_logp.stride(1), draft_logp.stride(0),
               draft_logp.stride(1))
    common = dict(K=k, HAS_GREEDY=has_greedy, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    _residual_chunk_kernel[(rows, num_chunks)](
        part, accepted, target_logp, draft_logp, drafts, accept_uniforms.double().contiguous(),
        greedy, argmax, vocab, num_chunks, *strides, **common)
    _residual_pick_kernel[(rows,)](
        tokens, logprobs, accepted, part, target_logp, draft_logp, drafts,
        final_uniforms.double().contiguous(), greedy, argmax, vocab, num_chunks, *strides,
        CHUNKS_PAD=max(16, triton.next_power_of_2(num_chunks)), **common)
    return tokens, logprobs, accepted


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
