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
from .cuda_graphs import DecodeGraphs
from .fused_speculation import FusedLaunch, FusedSpeculation
from .packing import pinned_copy
from .packing import upload_packed as _upload_packed
from .sampling_rows import SamplingRowCache
from .scheduler import ScheduledBatch
from .speculation import MTPSpeculator, Proposal, StepTables, Verified
from .sequence import Sequence
from .token_feed import TokenFeed, placeholder_sources


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
class Launched:
    """A step whose sampled tokens are on their way to the host (see ModelRunner.launch)."""

    seqs: list[Sequence]  # the sampled sequences, one per row
    host: torch.Tensor | None  # [2 or 3, R] float64: token ids, logprobs[, raw logprobs]
    top: tuple[torch.Tensor, torch.Tensor] | None  # top-k ids and logprobs
    done: torch.cuda.Event | None  # recorded after the copies (CUDA only)


@dataclass
class _Inputs:
    """One step's inputs, already on the device (one packed upload, see _prepare)."""

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
    tables: StepTables | None = None  # the block tables on host and device (speculative)
    feed: TokenFeed | None = None  # the previous launch's tokens input_ids still lacks


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, ops: KernelOps, kv_caches, block_size: int,
                 device: torch.device, eos_token_ids: frozenset[int], score_chunk_tokens: int,
                 graphs: DecodeGraphs | None = None, speculator: MTPSpeculator | None = None):
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.block_size, self.device = block_size, device
        self.sampling_rows = SamplingRowCache(eos_token_ids)
        self.score_chunk_tokens = score_chunk_tokens
        self.graphs = graphs
        self.speculator = speculator
        self.fused_speculation = None if speculator is None else \
            FusedSpeculation(speculator)
        self.fused_sampling = ops.name == "triton"
        self._last_tokens: torch.Tensor | None = None  # the newest launch's sampled tokens

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        if self.speculator is None:
            return self.resolve(self.launch(batch))
        return self.resolve(self.launch_speculative(batch))

    @torch.inference_mode()
    def launch_speculative(self, batch: ScheduledBatch) -> StepResult | FusedLaunch:
        """A speculative engine's step: a verify-only batch with graphs is launched as one
        fused step (resolve() reads it back); any other runs to completion here."""
        inputs = self._prepare(batch)
        if self._fuses_speculation(batch, inputs):
            return self.fused_speculation.launch(self.graphs, inputs, batch.seqs)
        hidden, logits = self._forward(batch, inputs)
        result = StepResult([], [], [], None, None) if logits is None else \
            self._to_host(inputs.sample_seqs, self._sample(logits, inputs.sample_seqs))
        self._speculate(hidden, inputs, result)
        return result

    @torch.inference_mode()
    def chain_speculative(self, launched: FusedLaunch, tables) -> FusedLaunch | None:
        """The next verify step of a launched fused step's sequences, launched before that
        one is read back (see FusedSpeculation.chain); None when its graph is not captured
        yet. tables: the block manager's mirror, already grown for the step."""
        if not self.fused_speculation.can_chain(self.graphs, launched):
            return None
        finished = np.array([seq.is_finished for seq in launched.seqs])
        if not finished.any():
            host = block_tables_of(launched.seqs, tables)
        else:  # finished sequences' rows stay as padding: their tables point at block 0
            live = block_tables_of([s for s in launched.seqs if not s.is_finished], tables)
            host = np.zeros((len(launched.seqs), live.shape[1]), dtype=np.int32)
            host[~finished] = live
        device_tables = _upload_packed([host], self.device)[0]
        return self.fused_speculation.chain(self.graphs, launched, device_tables,
                                            np.flatnonzero(finished))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, overlapped: bool = False) -> Launched:
        """Issue the step's work and the copy of its sampled tokens to the host without
        waiting for either. overlapped: the step before is still in flight and the tokens
        it sampled (placeholders on the host) are fed to this one on the device."""
        inputs = self._prepare(batch, overlapped)
        _, logits = self._forward(batch, inputs)
        if logits is None:
            return Launched([], None, None, None)
        out = self._sample(logits, inputs.sample_seqs)
        self._last_tokens = out.token_ids
        return self._start_copy(inputs.sample_seqs, out)

    def resolve(self, launched: Launched | FusedLaunch | StepResult) -> StepResult:
        """Wait for a launched step's tokens (the step's one host-device sync)."""
        if isinstance(launched, StepResult):
            return launched
        if isinstance(launched, FusedLaunch):
            verified, proposals = self.fused_speculation.resolve(launched)
            return StepResult([], [], [], None, None, verified, proposals)
        if launched.host is None:
            return StepResult([], [], [], None, None)
        if launched.done is not None:
            launched.done.synchronize()
        host, seqs = launched.host.numpy(), launched.seqs
        raw = host[2].tolist() if len(host) > 2 else None
        top = None
        if launched.top is not None:
            ids, lps = launched.top[0].tolist(), launched.top[1].tolist()
            top = [list(zip(ids[r], lps[r]))[:seqs[r].params.logprobs or 0]
                   for r in range(len(seqs))]
        return StepResult(seqs, host[0].astype(np.int64).tolist(), host[1].tolist(), raw, top)

    def _forward(self, batch: ScheduledBatch, inputs: _Inputs):
        query_len = self._graph_query_len(batch)
        if query_len:
            return self._graph_forward(inputs, query_len)
        return self._eager_forward(inputs)

    def _fuses_speculation(self, batch: ScheduledBatch, inputs: _Inputs) -> bool:
        """Every sequence verifies its drafts and graphs of that shape exist."""
        return (self._graph_query_len(batch) == self.speculator.k + 1
                and len(inputs.verify_rows) == len(batch.seqs))

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
        self.speculator.tables = inputs.tables
        result.proposals = self.speculator.propose(hidden, catch_up, drafting, counters)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        tensors = self._sampling_tensors(seqs)
        if not tensors.fused_kernel:
            return sample(logits, tensors)
        try:
            return sample(logits, tensors, packed=True)
        except Exception as error:  # a Triton build this kernel does not compile on
            warnings.warn(f"fused sampling kernel unavailable, using the torch sampler: "
                          f"{type(error).__name__}: {str(error)[:200]}")
            self.fused_sampling = False
            tensors.fused_kernel = False
            return sample(logits, tensors)

    def _graph_query_len(self, batch: ScheduledBatch) -> int:
        """q when every sequence computes q tokens and graphs of that shape exist, else 0."""
        if self.graphs is None:
            return 0
        query_len = batch.num_new_tokens[0]
        if (not self.graphs.fits(query_len, len(batch.seqs))
                or any(n != query_len for n in batch.num_new_tokens)
                or any(seq.is_score for seq in batch.seqs)):
            return 0
        return query_len

    def _graph_forward(self, inputs: _Inputs, query_len: int):
        hidden, logits = self.graphs.run(query_len, inputs.input_ids, inputs.positions,
                                         inputs.slot_mapping, inputs.context_lens,
                                         inputs.block_tables, inputs.feed)
        if not inputs.sample_seqs:
            return hidden, None
        if logits is None:  # verify-shaped: only prompt chunks that just ended sample
            rows = self._upload(torch.tensor(inputs.sample_rows))
            return hidden, self.model.compute_logits(hidden[rows], as_float32=False, ops=self.ops)
        if len(inputs.sample_rows) < logits.shape[0]:  # a 1-token prompt chunk does not
            logits = logits[self._upload(torch.tensor(inputs.sample_rows))]
        return hidden, logits

    def _eager_forward(self, inputs: _Inputs):
        up = self._upload
        if inputs.feed is not None:
            inputs.feed.apply(inputs.input_ids)
        meta = AttentionMetadata(up(inputs.slot_mapping), up(inputs.query_start_loc),
                                 up(inputs.context_lens), up(inputs.block_tables),
                                 inputs.max_query_len, inputs.max_context_len)
        hidden = self.model(self.ops, up(inputs.input_ids), up(inputs.positions),
                            self.kv_caches, meta)
        self._score(hidden, inputs.score_rows)
        if not inputs.sample_seqs:
            return hidden, None
        return hidden, self.model.compute_logits(hidden[up(torch.tensor(inputs.sample_rows))],
                                                 as_float32=False, ops=self.ops)

    # Sampling tensors built (and uploaded) by _prepare, for the _sample of the same step.
    _staged_sampling: tuple[list[Sequence], SamplingTensors] | None = None

    def _prepare(self, batch: ScheduledBatch, overlapped: bool = False) -> _Inputs:
        """The step's inputs on the device: metadata and sampling rows go up in one copy."""
        self._staged_sampling = None
        if batch.is_decode:
            host = self._decode_host(batch)
        elif self.is_verify_only(batch):
            host = self._verify_host(batch)
        else:
            host = self._general_host(batch)
        arrays = host.arrays
        sources = placeholder_sources(batch) if overlapped else None
        if sources is not None:
            arrays = arrays + [sources]
        sampling = None
        if host.sample_seqs:
            sampling = self.sampling_rows.step(host.sample_seqs, host.sample_positions)
            arrays = arrays + sampling.arrays
        views = _upload_packed(arrays, self.device)
        feed = None
        if sources is not None:  # applied by the forward (see TokenFeed)
            feed = TokenFeed(views.pop(len(host.arrays)), self._last_tokens)
        if sampling is not None:
            tensors = self.sampling_rows.tensors(sampling, views[len(host.arrays):],
                                                 self.fused_sampling)
            self._staged_sampling = (host.sample_seqs, tensors)
        tables = None
        if self.speculator is not None:
            tables = StepTables(host.arrays[5], views[5], batch.seqs)
        return _Inputs(*views[:len(host.arrays)], host.max_query_len, host.max_context_len,
                       host.sample_rows, host.sample_seqs, host.score_rows, host.rows,
                       host.verify_rows, tables, feed)

    def _decode_host(self, batch: ScheduledBatch) -> _HostInputs:
        """Every sequence computes its last token and samples: no per-token Python loop."""
        seqs, bs = batch.seqs, self.block_size
        count = len(seqs)
        positions = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        input_ids = np.array([s.token_ids[-1] for s in seqs], dtype=np.int64)
        tables = self._block_tables(batch)
        slots = tables[np.arange(count), positions // bs].astype(np.int64) * bs + positions % bs
        context_lens = (positions + 1).astype(np.int32)
        rows = ([(seq, i, int(p), 1) for i, (seq, p) in enumerate(zip(seqs, positions))]
                if self.speculator is not None else [])
        return _HostInputs([input_ids, positions, slots, np.arange(count + 1, dtype=np.int32),
                            context_lens, tables], 1, int(context_lens.max()),
                           list(range(count)), seqs, [], rows, [], positions)

    def is_verify_only(self, batch: ScheduledBatch) -> bool:
        """Every sequence computes its last token and its k drafts."""
        k1 = 0 if self.speculator is None else self.speculator.k + 1
        return bool(k1) and all(n == k1 for n in batch.num_new_tokens) and all(
            len(s.draft_tokens) + 1 == k1 and not s.is_score for s in batch.seqs)

    def _verify_host(self, batch: ScheduledBatch) -> _HostInputs:
        """Every sequence computes its last token and its k drafts: vectorised."""
        seqs, bs, k1 = batch.seqs, self.block_size, self.speculator.k + 1
        count = len(seqs)
        starts = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        positions = (starts[:, None] + np.arange(k1)).ravel()
        input_ids = np.array([[s.token_ids[-1], *s.draft_tokens] for s in seqs],
                             dtype=np.int64).ravel()
        tables = self._block_tables(batch)
        seq_rows = np.repeat(np.arange(count), k1)
        slots = tables[seq_rows, positions // bs].astype(np.int64) * bs + positions % bs
        query_start = np.arange(count + 1, dtype=np.int32) * k1
        context_lens = (starts + k1).astype(np.int32)
        rows = [(seq, i * k1, int(p), k1) for i, (seq, p) in enumerate(zip(seqs, starts))]
        return _HostInputs([input_ids, positions, slots, query_start, context_lens, tables],
                           k1, int(context_lens.max()), [], [], [], rows,
                           [(seq, i * k1) for i, seq in enumerate(seqs)], None)

    def _general_host(self, batch: ScheduledBatch) -> _HostInputs:
        input_ids, positions, slots, context_lens, query_start = [], [], [], [], [0]
        sample_rows, sample_seqs, score_rows, rows, verify_rows = [], [], [], [], []
        bs = self.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            start, row0 = seq.num_computed_tokens, len(input_ids)
            end = start + num_new
            tokens = seq.token_ids + seq.draft_tokens if seq.draft_tokens else seq.token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            if num_new == 1:
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
        arrays = [np.array(input_ids, dtype=np.int64), np.array(positions, dtype=np.int64),
                  np.array(slots, dtype=np.int64), np.array(query_start, dtype=np.int32),
                  np.array(context_lens, dtype=np.int32), self._block_tables(batch)]
        return _HostInputs(arrays, max(batch.num_new_tokens), max(context_lens), sample_rows,
                           sample_seqs, score_rows, rows, verify_rows, None)

    def _block_tables(self, batch: ScheduledBatch) -> np.ndarray:
        return block_tables_of(batch.seqs, batch.tables)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu" or host.device.type != "cpu":  # e.g. _prepare's views
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
        staged, self._staged_sampling = self._staged_sampling, None
        if staged is not None and staged[0] is seqs:
            return staged[1]
        step = self.sampling_rows.step(seqs, None)
        return self.sampling_rows.tensors(step, _upload_packed(step.arrays, self.device),
                                          self.fused_sampling)

    def _to_host(self, seqs: list[Sequence], out) -> StepResult:
        return self.resolve(self._start_copy(seqs, out))

    def _start_copy(self, seqs: list[Sequence], out) -> Launched:
        stacked = out.packed
        if stacked is None:
            tensors = [out.token_ids, out.logprobs]
            if out.raw_logprobs is not None:
                tensors.append(out.raw_logprobs)
            stacked = torch.stack([t.double() for t in tensors])
        top = None if out.top_token_ids is None else (out.top_token_ids, out.top_logprobs)
        if self.device.type != "cuda":
            return Launched(seqs, stacked, top, None)
        host = pinned_copy(stacked)
        if top is not None:
            top = (pinned_copy(top[0]), pinned_copy(top[1]))
        done = torch.cuda.Event()
        done.record()
        return Launched(seqs, host, top, done)


def block_tables_of(seqs: list[Sequence], tables) -> np.ndarray:
    """[B, longest] int32, -1 padded: gathered from the block manager's mirror (tables)
    where every sequence has a row there."""
    if tables is not None:
        rows = np.array([s.table_row for s in seqs], dtype=np.int64)
        if rows.min() >= 0:
            return tables.gather(rows)
    return _padded_tables([s.block_table for s in seqs])


def _padded_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [B, max_blocks] int32 array padded with -1."""
    widths = [len(t) for t in tables]
    out = np.full((len(tables), max(widths)), -1, dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=sum(widths))
    rows = np.repeat(np.arange(len(tables)), widths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(widths) - widths, widths)
    out[rows, cols] = flat
    return out


@dataclass
class _HostInputs:
    """_Inputs before the upload: [input_ids, positions, slot_mapping, query_start_loc,
    context_lens, block_tables] as numpy arrays."""

    arrays: list[np.ndarray]
    max_query_len: int
    max_context_len: int
    sample_rows: list[int]
    sample_seqs: list[Sequence]
    score_rows: list
    rows: list
    verify_rows: list
    sample_positions: np.ndarray | None  # decode steps: each sampled row's position
