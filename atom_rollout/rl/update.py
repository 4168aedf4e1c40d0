"""One optimizer update from one batch of rollouts, shared by GRPO and PPO.

The algorithm supplies per-token advantages (and, for PPO, a value loss); everything
else (micro-batching, the clipped objective with the rollout logprobs as the behaviour
policy, the mismatch statistics, clipping gradients, stepping) is here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..sampler import SamplingParams
from .losses import Mismatch, clipped_policy_loss
from .policy_forward import PolicyForward, pad, policy_forward
from .rollout import RolloutBatch

Forward = Callable[[RolloutBatch], PolicyForward]


class Algorithm(Protocol):
    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters besides the policy's (PPO's value head)."""

    def advantages(self, batch: RolloutBatch, forward: Forward) -> torch.Tensor:
        """[num_samples, max response length] advantages, fixed for this batch."""

    def extra_loss(self, out: PolicyForward, rows: slice) -> torch.Tensor:
        """Summed over the micro-batch's tokens (the caller normalises)."""

    def stats(self) -> dict:
        """Scalars to log for the last batch."""


@dataclass(frozen=True)
class UpdateSettings:
    params: SamplingParams  # the rollout's; defines the processed distribution
    epochs: int = 1  # optimizer steps per batch; the first measures the mismatch
    micro_batch: int = 64
    clip_low: float = 0.2
    clip_high: float = 0.28
    max_grad_norm: float = 1.0
    autocast_dtype: torch.dtype | None = None


def micro_slices(total: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def update_policy(policy: torch.nn.Module, algorithm: Algorithm,
                  optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                  settings: UpdateSettings) -> dict:
    def forward(b: RolloutBatch) -> PolicyForward:
        return policy_forward(policy, b.prompt_ids, b.response_ids, settings.params,
                              settings.autocast_dtype)

    device = next(policy.parameters()).device
    advantages = algorithm.advantages(batch, forward).to(device)
    num_tokens = sum(map(len, batch.response_ids))
    params = list(policy.parameters()) + algorithm.parameters()
    mismatch, clipped, loss_sum = Mismatch(), 0, 0.0
    for epoch in range(settings.epochs):
        optimizer.zero_grad(set_to_none=True)
        for rows in micro_slices(len(batch), settings.micro_batch):
            out = forward(batch.select(rows))
            behaviour = pad(batch.rollout_logprobs[rows], out.logprobs)
            if epoch == 0:
                mismatch.add(out.logprobs, behaviour, out.mask)
            policy_loss, num_clipped = clipped_policy_loss(
                out.logprobs, behaviour, advantages[rows, :out.mask.shape[1]], out.mask,
                settings.clip_low, settings.clip_high)
            loss = (policy_loss + algorithm.extra_loss(out, rows)) / num_tokens
            loss.backward()
            clipped += int(num_clipped)
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
    return {**mismatch.as_dict(), "loss": loss_sum / settings.epochs,
            "clip_frac": clipped / (num_tokens * settings.epochs),
            "grad_norm": float(grad_norm), **algorithm.stats()}
