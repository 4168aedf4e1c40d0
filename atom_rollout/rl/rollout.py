"""One step's rollouts: n samples per prompt from the engine, decoded and rewarded."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import RolloutOutput
from .tasks import reward


@dataclass
class RolloutBatch:
    """Samples flattened prompt-major: the `group_size` samples of prompt 0, then 1, ..."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]  # behaviour policy: the engine's processed logprobs
    rewards: torch.Tensor  # [num_samples] float32
    group_size: int
    weight_versions: list[int]

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: slice) -> "RolloutBatch":
        return RolloutBatch(self.prompt_ids[rows], self.response_ids[rows],
                            self.rollout_logprobs[rows], self.rewards[rows], self.group_size,
                            self.weight_versions[rows])

    def mean_response_length(self) -> float:
        return sum(map(len, self.response_ids)) / len(self)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Chat models get their chat template (one user turn); others the plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(text, add_special_tokens=False)


def to_batch(outputs: list[RolloutOutput], answers: list[str], tokenizer,
             group_size: int) -> RolloutBatch:
    prompts, responses, logprobs, rewards, versions = [], [], [], [], []
    for out, answer in zip(outputs, answers):
        for sample in out.samples:
            prompts.append(out.prompt_token_ids)
            responses.append(sample.token_ids)
            logprobs.append(sample.logprobs)
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            rewards.append(reward(text, answer))
            versions.append(sample.weight_version)
    return RolloutBatch(prompts, responses, logprobs, torch.tensor(rewards), group_size,
                        versions)
