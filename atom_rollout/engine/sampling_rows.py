"""The sampling side of a step's inputs: per-row settings (cached while the same
sequences sample) and this step's draws and banned tokens, as host arrays that travel in
the step's one packed upload, then as SamplingTensors on the device."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sampler import SamplingTensors
from ..sampler.noise import row_uniforms_np
from .sequence import Sequence


class SamplingRowCache:
    def __init__(self, eos_token_ids: frozenset[int]):
        self.eos_token_ids = eos_token_ids
        self.rows: SamplingRows | None = None  # settings of the last step's sampled rows

    def step(self, seqs: list[Sequence], positions: np.ndarray | None) -> StepSampling:
        """Host arrays of the rows' settings (cached while the same sequences sample) and
        of this step's draws. positions: each row's last token position, when known."""
        cache = self.rows
        if cache is None or cache.seqs != seqs:
            cache = self.rows = SamplingRows.build(seqs)
        if positions is None:
            counters = np.array([s.num_output_tokens for s in seqs], dtype=np.int64)
        else:
            counters = positions + 1 - cache.prompt_lens
        arrays = [] if cache.on_device else [cache.temperature, cache.top_k, cache.top_p,
                                              cache.min_p]
        arrays.append(row_uniforms_np(cache.keys, counters))
        banned = self._banned(seqs) if cache.any_min_tokens else []
        if banned:
            arrays.append(np.ascontiguousarray(np.array(banned, dtype=np.int64).T))
        return StepSampling(cache, arrays)

    def _banned(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """(row, token) pairs of stop tokens a row may not draw yet (min_tokens)."""
        return [(row, token) for row, s in enumerate(seqs)
                if s.num_output_tokens < s.params.min_tokens
                for token in self._stop_tokens(s)]

    def tensors(self, step: StepSampling, views: list[torch.Tensor],
                fused_kernel: bool) -> SamplingTensors:
        """SamplingTensors from the uploaded views of step.arrays."""
        rows = step.rows
        if not rows.on_device:  # uploaded this step; reused while the rows stay the same
            rows.on_device, views = views[:4], views[4:]
        temperature, top_k, top_p, min_p = rows.on_device
        return SamplingTensors(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            uniforms=views[0], banned=views[1] if len(views) > 1 else None,
            use_sort=rows.use_sort, use_min_p=rows.use_min_p,
            num_top_logprobs=rows.num_top_logprobs, all_greedy=rows.all_greedy,
            any_greedy=rows.any_greedy, need_raw=rows.need_raw,
            fused_kernel=fused_kernel)

    def _stop_tokens(self, seq: Sequence) -> set[int]:
        eos = set() if seq.params.ignore_eos else set(self.eos_token_ids)
        return eos | set(seq.params.stop_token_ids)


@dataclass
class SamplingRows:
    """Sampling settings of a list of sequences as host arrays; they never change during a
    request, so they are rebuilt only when the batch's sequences change."""

    seqs: list[Sequence]
    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int64
    top_p: np.ndarray  # float32
    min_p: np.ndarray  # float32
    keys: np.ndarray  # int64 noise keys
    prompt_lens: np.ndarray  # int64
    any_min_tokens: bool
    use_sort: bool
    use_min_p: bool
    num_top_logprobs: int
    all_greedy: bool
    any_greedy: bool
    need_raw: bool
    on_device: list[torch.Tensor] | None = None  # temperature, top_k, top_p, min_p

    @classmethod
    def build(cls, seqs: list[Sequence]) -> "SamplingRows":
        params = [s.params for s in seqs]
        # Flags from float64 copies: float32 could round e.g. top_p=0.99999999 up to 1.
        temperature = np.array([p.temperature for p in params], dtype=np.float64)
        top_k = np.array([p.top_k for p in params], dtype=np.int64)
        top_p = np.array([p.top_p for p in params], dtype=np.float64)
        min_p = np.array([p.min_p for p in params], dtype=np.float64)
        sampled = temperature != 0  # not greedy
        any_greedy = not sampled.all()
        return cls(list(seqs), temperature.astype(np.float32), top_k,
                   top_p.astype(np.float32), min_p.astype(np.float32),
                   np.array([s.noise_key for s in seqs], dtype=np.uint64).view(np.int64),
                   np.array([s.num_prompt_tokens for s in seqs], dtype=np.int64),
                   any(p.min_tokens > 0 for p in params),
                   bool((((top_k > 0) | (top_p < 1)) & sampled).any()),
                   bool(((min_p > 0) & sampled).any()),
                   max(p.logprobs or 0 for p in params),
                   not sampled.any(), any_greedy,
                   any_greedy or any(p.return_raw_logprobs for p in params))


@dataclass
class StepSampling:
    rows: SamplingRows
    arrays: list[np.ndarray]  # [temperature, top_k, top_p, min_p,] uniforms[, banned [2, N]]
