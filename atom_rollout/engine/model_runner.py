"""ModelRunner: turns a scheduled batch into tensors, runs the model, samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import AttentionMetadata, KernelOps
from ..models import DecoderForCausalLM
from ..sampler import SamplingTensors, sample
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepResult:
    sampled_seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    top: list[list[tuple[int, float]]] | None


@dataclass
class _Inputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: list[int]  # flat token index whose logits draw the next token
    sample_seqs: list[Sequence]
    score_rows: list[tuple[Sequence, int, int, int]]  # (seq, flat row, position, count)


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, ops: KernelOps, kv_caches, block_size: int,
                 device: torch.device, eos_token_ids: frozenset[int], score_chunk_tokens: int):
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.block_size, self.device = block_size, device
        self.eos_token_ids = eos_token_ids
        self.score_chunk_tokens = score_chunk_tokens

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        inputs = self._prepare(batch)
        hidden = self.model(self.ops, inputs.input_ids, inputs.positions, self.kv_caches,
                            inputs.meta)
        self._score(hidden, inputs.score_rows)
        if not inputs.sample_seqs:
            return StepResult([], [], [], [], None)
        rows = torch.tensor(inputs.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        out = sample(logits, self._sampling_tensors(inputs.sample_seqs))
        return self._to_host(inputs.sample_seqs, out)

    def _prepare(self, batch: ScheduledBatch) -> _Inputs:
        input_ids, positions, slots, context_lens, query_start = [], [], [], [], [0]
        sample_rows, sample_seqs, score_rows = [], [], []
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start, end, row0 = seq.num_computed_tokens, seq.num_computed_tokens + num_new, len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            query_start.append(query_start[-1] + num_new)
            if seq.is_score:
                first = max(start, seq.first_logit_position)
                count = min(end, seq.num_tokens - 1) - first
                if count > 0:
                    score_rows.append((seq, row0 + first - start, first, count))
            elif end == seq.num_tokens:
                sample_rows.append(row0 + num_new - 1)
                sample_seqs.append(seq)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [-1] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            query_start_loc=self._tensor(query_start, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            block_tables=self._tensor(tables, torch.int32),
            max_query_len=max(batch.num_new_tokens), max_context_len=max(context_lens))
        return _Inputs(self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64),
                       meta, sample_rows, sample_seqs, score_rows)

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _score(self, hidden: torch.Tensor, score_rows) -> None:
        """Logprobs of given tokens, materialising at most score_chunk_tokens
        rows of logits at a time."""
        for seq, row0, first_pos, count in score_rows:
            targets = torch.tensor(seq.token_ids[first_pos + 1:first_pos + 1 + count],
                                   device=self.device)
            for offset in range(0, count, self.score_chunk_tokens):
                n = min(self.score_chunk_tokens, count - offset)
                logits = self.model.compute_logits(hidden[row0 + offset:row0 + offset + n])
                logp = torch.log_softmax(logits / seq.score_temperature, dim=-1)
                seq.score_pieces.append(logp.gather(-1, targets[offset:offset + n, None])[:, 0])

    def _sampling_tensors(self, seqs: list[Sequence]) -> SamplingTensors:
        params = [s.params for s in seqs]
        banned = [(row, token) for row, s in enumerate(seqs)
                  if s.num_output_tokens < s.params.min_tokens
                  for token in self._stop_tokens(s)]
        return SamplingTensors(
            temperature=self._tensor([p.temperature for p in params], torch.float32),
            top_k=self._tensor([p.top_k for p in params], torch.int64),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            min_p=self._tensor([p.min_p for p in params], torch.float32),
            keys=self._tensor([_signed64(s.noise_key) for s in seqs], torch.int64),
            counters=self._tensor([s.num_output_tokens for s in seqs], torch.int64),
            banned=self._tensor(banned, torch.int64).T.contiguous() if banned else None,
            use_sort=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
            use_min_p=any(p.min_p > 0 for p in params if not p.greedy),
            num_top_logprobs=max(p.logprobs or 0 for p in params))

    def _stop_tokens(self, seq: Sequence) -> set[int]:
        eos = set() if seq.params.ignore_eos else set(self.eos_token_ids)
        return eos | set(seq.params.stop_token_ids)

    def _to_host(self, seqs: list[Sequence], out) -> StepResult:
        tensors = [out.token_ids, out.logprobs, out.raw_logprobs]
        host = [t.tolist() for t in tensors]  # the step's one device->host sync
        top = None
        if out.top_token_ids is not None:
            ids, lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
            top = [list(zip(ids[r], lps[r]))[:seqs[r].params.logprobs or 0]
                   for r in range(len(seqs))]
        return StepResult(seqs, host[0], host[1], host[2], top)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value
