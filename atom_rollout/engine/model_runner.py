"""ModelRunner: turns a scheduled batch into tensors, runs the model, samples."""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..kernels import AttentionMetadata, KernelOps
from ..models import DecoderForCausalLM
from ..sampler import SamplingTensors, sample
from ..sampler.noise import row_uniforms, signed64
from .cuda_graphs import DecodeGraphs
from .scheduler import ScheduledBatch
from .speculation import MTPSpeculator, Proposal, Verified
from .sequence import Sequence


@dataclass
class StepResult:
    sampled_seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[float]
    raw_logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    verified: list[Verified] = field(default_factory=list)  # speculative steps only
    proposals: list[Proposal] = field(default_factory=list)


@dataclass
class _Inputs:
    """One step's inputs as host tensors."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_context_len: int
    sample_rows: list[int]  # flat token index whose logits draw the next token
    sample_seqs: list[Sequence]
    score_rows: list[tuple[Sequence, int, int, int]]  # (seq, flat row, position, count)
    rows: list[tuple[Sequence, int, int, int]]  # generation seqs: (seq, row, start, count)
    verify_rows: list[tuple[Sequence, int]]  # seqs whose drafts this step verifies


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, ops: KernelOps, kv_caches, block_size: int,
                 device: torch.device, eos_token_ids: frozenset[int], score_chunk_tokens: int,
                 graphs: DecodeGraphs | None = None, speculator: MTPSpeculator | None = None):
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.block_size, self.device = block_size, device
        self.eos_token_ids = eos_token_ids
        self.score_chunk_tokens = score_chunk_tokens
        self.graphs = graphs
        self.speculator = speculator
        self.fused_sampling = ops.name == "triton"

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        inputs = self._prepare(batch)
        hidden = None
        if self._is_graph_step(batch):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping,
                                     inputs.context_lens, inputs.block_tables)
        else:
            hidden, logits = self._eager_forward(inputs)
        result = StepResult([], [], [], None, None) if logits is None else \
            self._to_host(inputs.sample_seqs, self._sample(logits, inputs.sample_seqs))
        if self.speculator is not None:
            self._speculate(hidden, inputs, result)
        return result

    def _speculate(self, hidden: torch.Tensor, inputs: _Inputs, result: StepResult) -> None:
        """Verify this step's drafts, then give every sequence with a fresh token k new ones."""
        result.verified = self.speculator.verify(hidden, inputs.verify_rows)
        fresh = {id(s): [t] for s, t in zip(result.sampled_seqs, result.token_ids)}
        fresh.update({id(v.seq): v.token_ids for v in result.verified})
        catch_up, drafting, counters = [], [], {}
        for seq, row0, start, count in inputs.rows:
            new = fresh.get(id(seq))
            if new is None:  # a prefill chunk: its next tokens are all prompt tokens
                catch_up.append((seq, row0, start, seq.token_ids[start + 1:start + count + 1]))
                continue
            known = new if seq.draft_tokens else seq.token_ids[start + 1:start + count] + new
            catch_up.append((seq, row0, start, known))
            drafting.append(seq)
            counters[id(seq)] = seq.num_output_tokens + len(new)
        result.proposals = self.speculator.propose(hidden, catch_up, drafting, counters)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        tensors = self._sampling_tensors(seqs)
        if not tensors.fused_kernel:
            return sample(logits, tensors)
        try:
            return sample(logits, tensors)
        except Exception as error:  # a Triton build this kernel does not compile on
            warnings.warn(f"fused sampling kernel unavailable, using the torch sampler: "
                          f"{type(error).__name__}: {str(error)[:200]}")
            self.fused_sampling = False
            tensors.fused_kernel = False
            return sample(logits, tensors)

    def _is_graph_step(self, batch: ScheduledBatch) -> bool:
        return (self.graphs is not None and self.speculator is None and len(batch.seqs) <= self.graphs.max_batch
                and batch.num_tokens == len(batch.seqs)
                and not any(seq.is_score for seq in batch.seqs))

    def _eager_forward(self, inputs: _Inputs):
        up = self._upload
        meta = AttentionMetadata(up(inputs.slot_mapping), up(inputs.query_start_loc),
                                 up(inputs.context_lens), up(inputs.block_tables),
                                 inputs.max_query_len, inputs.max_context_len)
        hidden = self.model(self.ops, up(inputs.input_ids), up(inputs.positions),
                            self.kv_caches, meta)
        self._score(hidden, inputs.score_rows)
        if not inputs.sample_seqs:
            return hidden, None
        return hidden, self.model.compute_logits(hidden[up(torch.tensor(inputs.sample_rows))])

    def _prepare(self, batch: ScheduledBatch) -> _Inputs:
        input_ids, positions, slots, context_lens, query_start = [], [], [], [], [0]
        sample_rows, sample_seqs, score_rows, rows, verify_rows = [], [], [], [], []
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start, end, row0 = seq.num_computed_tokens, seq.num_computed_tokens + num_new, len(input_ids)
            tokens = seq.token_ids + seq.draft_tokens if seq.draft_tokens else seq.token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            if num_new == 1:  # decode: the common case, kept cheap
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            query_start.append(query_start[-1] + num_new)
            if seq.is_score:
                first = max(start, seq.first_logit_position)
                count = min(end, seq.num_tokens - 1) - first
                if count > 0:
                    score_rows.append((seq, row0 + first - start, first, count))
                continue
            rows.append((seq, row0, start, num_new))
            if seq.draft_tokens:
                verify_rows.append((seq, row0))
            elif end == seq.num_tokens:
                sample_rows.append(row0 + num_new - 1)
                sample_seqs.append(seq)
        as_tensor = torch.tensor
        tables = _padded_tables([s.block_table for s in batch.seqs])
        return _Inputs(as_tensor(input_ids, dtype=torch.int64),
                       as_tensor(positions, dtype=torch.int64),
                       as_tensor(slots, dtype=torch.int64),
                       as_tensor(query_start, dtype=torch.int32),
                       as_tensor(context_lens, dtype=torch.int32),
                       tables,
                       max(batch.num_new_tokens), max(context_lens),
                       sample_rows, sample_seqs, score_rows, rows, verify_rows)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return self._upload(torch.tensor(values, dtype=dtype))

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
        greedy = [p.greedy for p in params]
        keys = torch.tensor([signed64(s.noise_key) for s in seqs], dtype=torch.int64)
        counters = torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64)
        return SamplingTensors(
            temperature=self._tensor([p.temperature for p in params], torch.float32),
            top_k=self._tensor([p.top_k for p in params], torch.int64),
            top_p=self._tensor([p.top_p for p in params], torch.float32),
            min_p=self._tensor([p.min_p for p in params], torch.float32),
            uniforms=self._upload(row_uniforms(keys, counters)),  # a few host ops per row
            banned=self._tensor(banned, torch.int64).T.contiguous() if banned else None,
            use_sort=any(p.top_k > 0 or p.top_p < 1 for p in params if not p.greedy),
            use_min_p=any(p.min_p > 0 for p in params if not p.greedy),
            num_top_logprobs=max(p.logprobs or 0 for p in params),
            all_greedy=all(greedy), any_greedy=any(greedy),
            need_raw=any(greedy) or any(p.return_raw_logprobs for p in params),
            fused_kernel=self.fused_sampling)

    def _stop_tokens(self, seq: Sequence) -> set[int]:
        eos = set() if seq.params.ignore_eos else set(self.eos_token_ids)
        return eos | set(seq.params.stop_token_ids)

    def _to_host(self, seqs: list[Sequence], out) -> StepResult:
        tensors = [out.token_ids, out.logprobs]
        if out.raw_logprobs is not None:
            tensors.append(out.raw_logprobs)
        host = [t.tolist() for t in torch.stack([t.double() for t in tensors]).cpu()]
        host[0] = [int(t) for t in host[0]]  # the step's one device->host sync is above
        top = None
        if out.top_token_ids is not None:
            ids, lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
            top = [list(zip(ids[r], lps[r]))[:seqs[r].params.logprobs or 0]
                   for r in range(len(seqs))]
        return StepResult(seqs, host[0], host[1], host[2] if len(host) > 2 else None, top)


def _padded_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [B, max_blocks] int32 tensor padded with -1."""
    widths = [len(t) for t in tables]
    out = np.full((len(tables), max(widths)), -1, dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=sum(widths))
    rows = np.repeat(np.arange(len(tables)), widths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(widths) - widths, widths)
    out[rows, cols] = flat
    return torch.from_numpy(out)
