"""Logits -> the processed distribution a token is actually sampled from."""
from __future__ import annotations

import torch


def processed_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor, min_p: torch.Tensor,
                       use_sort: bool, use_min_p: bool) -> torch.Tensor:
    """Log-probabilities after temperature, then top-k, then top-p, then min-p.

    logits [R, V] float32; per-row temperature (0 is treated as 1: greedy rows
    are decided elsewhere), top_k (0 = off), top_p, min_p. Filtered tokens get
    -inf. ``use_sort``/``use_min_p`` are host flags that skip unused filters.
    """
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if use_sort:
        scaled = _top_k_top_p(scaled, top_k, top_p)
    logp = torch.log_softmax(scaled, dim=-1)
    if use_min_p:
        max_logp = logp.max(dim=-1, keepdim=True).values
        threshold = max_logp + torch.log(min_p.clamp(min=1e-38))[:, None]
        too_small = (logp < threshold) & (min_p > 0)[:, None]
        logp = torch.log_softmax(logp.masked_fill(too_small, float("-inf")), dim=-1)
    return logp


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = scaled.shape[-1]
    sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth_value = sorted_vals.gather(-1, (k - 1)[:, None])
    # Ties with the k-th value stay, as in transformers' TopKLogitsWarper.
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth_value, float("-inf"))
    probs = torch.softmax(sorted_vals, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p[:, None]
    drop_sorted[:, 0] = False
    sorted_vals = sorted_vals.masked_fill(drop_sorted, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, sorted_idx, sorted_vals)
