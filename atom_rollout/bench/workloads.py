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
    def num_sequences(self) -> int:
        return sum(p.n for p in self.params)


def _random_prompts(vocab_size: int, lengths: list[int], gen: torch.Generator) -> list[list[int]]:
    return [torch.randint(2, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def grpo(vocab_size: int, num_prompts: int, n: int, prompt_len: int, output_len: int,
         seed: int = 0) -> Workload:
    """GRPO-shaped: every prompt sampled n times at temperature 1."""
    gen = torch.Generator().manual_seed(seed)
    prompts = _random_prompts(vocab_size, [prompt_len] * num_prompts, gen)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=output_len, ignore_eos=True)
    return Workload(f"grpo {num_prompts}x{n}, {prompt_len}->{output_len}", prompts,
                    [params] * num_prompts)


def nano_vllm(vocab_size: int, num_seqs: int = 256, low: int = 100, high: int = 1024,
              seed: int = 0) -> Workload:
    """nano-vllm's benchmark: input and output lengths uniform in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    input_lens = torch.randint(low, high + 1, (num_seqs,), generator=gen).tolist()
    output_lens = torch.randint(low, high + 1, (num_seqs,), generator=gen).tolist()
    prompts = _random_prompts(vocab_size, input_lens, gen)
    params = [SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True) for m in output_lens]
    return Workload(f"nano-vllm {num_seqs} seqs, in/out U[{low},{high}]", prompts, params)


def generate_workload(name: str, vocab_size: int, smoke: bool = False) -> Workload:
    """The benchmark's generate workloads by name ("nano-vllm", "grpo"): full size, or a
    tiny version for CPU smoke runs of the profiling scripts."""
    if name == "grpo":
        return (grpo(vocab_size, 4, 4, 32, 32) if smoke
                else grpo(vocab_size, 64, 16, 512, 1024))
    if name == "nano-vllm":
        return nano_vllm(vocab_size, 16, 10, 40) if smoke else nano_vllm(vocab_size)
    raise ValueError(f"workload: unknown {name!r}; known: nano-vllm, grpo")


def latency(vocab_size: int, prompt_len: int = 128, output_len: int = 256,
            seed: int = 0) -> Workload:
    """Batch 1 decode; timed as (time for output_len tokens - time for 1) / (output_len - 1)."""
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    return Workload(f"batch-1 decode, {prompt_len}->{output_len}",
                    _random_prompts(vocab_size, [prompt_len], gen), [params])


def score_pairs(vocab_size: int, num_seqs: int, prompt_len: int, response_len: int,
                seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return (_random_prompts(vocab_size, [prompt_len] * num_seqs, gen),
            _random_prompts(vocab_size, [response_len] * num_seqs, gen))
