"""Trainer side: the policy's logprobs of the sampled tokens under the *same* processed
distribution the engine sampled from (temperature, top-k, top-p, min-p), so the
importance ratio against the rollout logprobs is 1 up to numerics."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..sampler import SamplingParams
from ..sampler.processing import processed_logprobs


@dataclass
class PolicyForward:
    logprobs: torch.Tensor  # [B, T] float32, response tokens; 0 at padding
    mask: torch.Tensor  # [B, T] bool, True on response tokens
    hidden: torch.Tensor  # [B, T, H] final hidden state that predicted each response token


def pad(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Right-pad ragged rows into a [B, T] tensor shaped like `like`."""
    out = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def policy_forward(model, prompts: list[list[int]], responses: list[list[int]],
                   params: SamplingParams, autocast_dtype: torch.dtype | None = None
                   ) -> PolicyForward:
    """One forward over prompt+response; logits only at the response positions."""
    device = next(model.parameters()).device
    rows, cols, positions, tokens = _response_index(prompts, responses)
    input_ids = _right_padded([p + r for p, r in zip(prompts, responses)]).to(device)
    index = [torch.tensor(x, device=device) for x in (rows, cols, positions, tokens)]
    with _autocast(device, autocast_dtype):
        # Right padding needs no attention mask: causal attention never looks right.
        hidden_all = model.base_model(input_ids=input_ids).last_hidden_state
        hidden = hidden_all[index[0], index[2]]
        logits = model.get_output_embeddings()(hidden)
    logp = _processed(logits.float(), params).gather(-1, index[3][:, None])[:, 0]
    shape = (len(responses), max(map(len, responses)))
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    out = out.index_put((index[0], index[1]), logp)
    mask[index[0], index[1]] = True
    hidden_out = hidden.new_zeros(*shape, hidden.shape[-1]).index_put((index[0], index[1]),
                                                                      hidden)
    return PolicyForward(out, mask, hidden_out)


def _processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.greedy or params.min_tokens:
        raise ValueError("policy_forward: training needs temperature > 0 and min_tokens=0")
    rows = logits.shape[0]

    def full(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device=logits.device)
    return processed_logprobs(logits, full(params.temperature, torch.float32),
                              full(params.top_k, torch.int64), full(params.top_p, torch.float32),
                              full(params.min_p, torch.float32),
                              params.top_k > 0 or params.top_p < 1, params.min_p > 0)


def _response_index(prompts, responses):
    rows, cols, positions, tokens = [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows += [i] * len(r)
        cols += range(len(r))
        positions += range(len(p) - 1, len(p) - 1 + len(r))
        tokens += r
    return rows, cols, positions, tokens


def _right_padded(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
