"""Benchmark workloads: prompts plus SamplingParams, generated from a seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampler import SamplingParams


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    params: list[SamplingParams]

    @property
    def num_output_tokens(self) -> int:
        return sum(p.n * p.max_tokens for p in self.params)  # ignore_eos: exact


def grpo(vocab_size: int, num_prompts: int, n: int, prompt_len: int, output_len: int,
         seed: int = 0) -> Workload:
    """GRPO-shaped: every prompt sampled n times at temperature 1."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, vocab_size, (num_prompts, prompt_len), generator=gen).tolist()
    params = SamplingParams(n=n, temperature=1.0, max_tokens=output_len, ignore_eos=True)
    return Workload(f"grpo {num_prompts}x{n}, {prompt_len}->{output_len}", prompts,
                    [params] * num_prompts)
