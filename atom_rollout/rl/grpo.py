"""GRPO: the advantage of a sample is its reward normalised within its prompt's group."""
from __future__ import annotations

import torch

from .rollout import RolloutBatch
from .update import Forward


class GRPO:
    def __init__(self, scale_by_std: bool = True, eps: float = 1e-6):
        self.scale_by_std = scale_by_std  # False: Dr. GRPO's mean-only centring
        self.eps = eps

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def advantages(self, batch: RolloutBatch, forward: Forward) -> torch.Tensor:
        groups = batch.rewards.view(-1, batch.group_size)
        centred = groups - groups.mean(dim=1, keepdim=True)
        if self.scale_by_std:
            centred = centred / (groups.std(dim=1, keepdim=True) + self.eps)
        width = max(map(len, batch.response_ids))
        return centred.reshape(-1, 1).expand(-1, width)

    def extra_loss(self, out, rows: slice) -> torch.Tensor:
        return torch.zeros((), device=out.logprobs.device)

    def stats(self) -> dict:
        return {}

