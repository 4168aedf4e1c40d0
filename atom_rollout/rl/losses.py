"""The clipped policy objective and the trainer-vs-rollout mismatch statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def clipped_policy_loss(logprobs: torch.Tensor, behaviour: torch.Tensor,
                        advantages: torch.Tensor, mask: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over tokens of -min(r A, clip(r) A), r = exp(logprobs - behaviour); also the
    number of clipped tokens. Callers divide by the batch's token count."""
    ratio = torch.exp(logprobs - behaviour)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    was_clipped = (ratio * advantages > clipped * advantages) & mask
    return loss[mask].sum(), was_clipped.sum()


@dataclass
class Mismatch:
    """|trainer logprob - rollout logprob| over response tokens, before any update."""

    abs_sum: float = 0.0
    abs_max: float = 0.0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    tokens: int = 0

    def add(self, logprobs: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> None:
        diff = (logprobs.detach() - behaviour)[mask]
        if diff.numel() == 0:
            return
        ratio = diff.exp()
        self.abs_sum += diff.abs().sum().item()
        self.abs_max = max(self.abs_max, diff.abs().max().item())
        self.ratio_min = min(self.ratio_min, ratio.min().item())
        self.ratio_max = max(self.ratio_max, ratio.max().item())
        self.tokens += diff.numel()

    def as_dict(self) -> dict:
        return {"mismatch_mean": self.abs_sum / max(self.tokens, 1),
                "mismatch_max": self.abs_max, "ratio_min": self.ratio_min,
                "ratio_max": self.ratio_max}
