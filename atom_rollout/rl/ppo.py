"""PPO: a value head on the policy's last hidden state, advantages by GAE over the
response tokens (the exact-match reward arrives on the last token)."""
from __future__ import annotations

import torch

from .policy_forward import PolicyForward
from .rollout import RolloutBatch
from .update import Forward, micro_slices


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates over right-padded [B, T] tensors (0 past the end)."""
    values = values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = (rewards[:, t] + gamma * next_value - values[:, t]) * mask[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    valid = x[mask]
    return ((x - valid.mean()) / (valid.std() + eps)) * mask


class PPO:
    def __init__(self, hidden_size: int, device: torch.device | str, gamma: float = 1.0,
                 lam: float = 0.95, value_coef: float = 0.1, micro_batch: int = 64):
        self.value_head = torch.nn.Linear(hidden_size, 1, device=device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.gamma, self.lam, self.value_coef = gamma, lam, value_coef
        self.micro_batch = micro_batch
        self.returns: torch.Tensor | None = None
        self._stats: dict = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.value_head.parameters())

    def values(self, out: PolicyForward) -> torch.Tensor:
        return self.value_head(out.hidden.float()).squeeze(-1) * out.mask

    @torch.no_grad()
    def advantages(self, batch: RolloutBatch, forward: Forward) -> torch.Tensor:
        width = max(map(len, batch.response_ids))
        pieces = []
        for rows in micro_slices(len(batch), self.micro_batch):
            out = forward(batch.select(rows))
            pieces.append((self.values(out), out.mask))
        values = _cat_padded([v for v, _ in pieces], width)
        mask = _cat_padded([m for _, m in pieces], width).bool()
        rewards = torch.zeros_like(values)
        last = torch.tensor([len(r) - 1 for r in batch.response_ids], device=values.device)
        rewards[torch.arange(len(batch), device=values.device), last] = \
            batch.rewards.to(values.device)
        advantages = gae(rewards, values, mask.float(), self.gamma, self.lam)
        self.returns = advantages + values
        self._stats = {"value_mean": values[mask].mean().item()}
        return whiten(advantages, mask)

    def extra_loss(self, out: PolicyForward, rows: slice) -> torch.Tensor:
        returns = self.returns[rows, :out.mask.shape[1]]
        squared = (self.values(out) - returns) ** 2
        return 0.5 * self.value_coef * squared[out.mask].sum()

    def stats(self) -> dict:
        return self._stats


def _cat_padded(pieces: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(p.float(), (0, width - p.shape[1]))
                      for p in pieces])
