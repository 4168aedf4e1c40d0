"""A whole speculative decode step as one CUDA-graph replay and one readback.

When every sequence of a batch verifies its k drafts (q = k + 1 tokens each), the
step's work after the target forward has fixed shapes, so it joins the forward's graph
as a tail (DecodeGraphs.run_with_tail): processed target distributions, exact rejection
sampling (sampler/speculative.py), the MTP catch-up over all k + 1 rows (rows past the
accepted run read and write only positions that later steps overwrite), the row at the
accepted count picked on the device, and the k-step draft chain with its positions and
KV slots computed on the device. Uniforms come from the same counter-based noise as the
eager path (engine/speculation.py), with counters derived on the device, so both paths
draw the same tokens; on the Triton backend the sampled rows' verification and the
uniforms take one or two launches each (kernels/triton/speculative_verify.py, noise.py).
The host reads back one [B, 2k + 4] tensor per step.

The tail also writes the next verify step's inputs (final token, drafts, positions, KV
slots, context lengths) over the graph's static inputs, so the core can launch that step
(chain) before it reads this one back: while a batch stays the same, the GPU runs steps
back to back and the host's bookkeeping of step t overlaps step t + 1 (EngineCore.
_step_speculative decides when; sequences a step finishes have their rows of the chained
step dropped, and later chained steps run those rows as padding, see chain).

Per-sequence settings (noise keys, prompt lengths, processing parameters) are uploaded
when the batch composition changes; the draft distributions live in one [B, k, V]
buffer that the next step's verification reads (re-stacked when the rows change).
Graph variants (the host flags of the batch's rows): all greedy, or sampled with or
without greedy rows, top-k/top-p and min-p.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import AttentionMetadata
from ..sampler.noise import signed64, step_uniforms
from ..sampler.sampler import greedy_pick
from ..sampler.speculative import greedy_verify, verify
from .cuda_graphs import DecodeGraphs
from .packing import pinned_copy, upload_packed
from .sequence import Sequence
from .speculation import (_ACCEPT_SALT, _DRAFT_SALT, _FINAL_SALT, _SPEC_KEY, BufferedDraft,
                          MTPSpeculator, Proposal, RowKind, Verified, draft_distributions,
                          draft_rows, row_logprobs)


@dataclass
class _Params:
    """processed_rows / draft_rows parameters over static buffers."""

    kind: RowKind
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    def __post_init__(self):
        self.greedy = self.temperature == 0
        self.greedy_rows = self.greedy[:, None]

    def repeated(self, times: int) -> "_Params":
        def rep(values):
            return values[:, None].expand(-1, times).reshape(-1)
        return _Params(self.kind, rep(self.temperature), rep(self.top_k), rep(self.top_p),
                       rep(self.min_p))


class _StaticRows:
    """Per-row device buffers the tail reads, sized for the graphs' largest batch."""

    def __init__(self, max_batch: int, k: int, device: torch.device):
        new = dict(device=device)
        self.keys = torch.zeros(max_batch, dtype=torch.int64, **new)
        self.prompt_lens = torch.zeros(max_batch, dtype=torch.int64, **new)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, **new)
        self.top_p = torch.ones(max_batch, dtype=torch.float32, **new)
        self.min_p = torch.zeros(max_batch, dtype=torch.float32, **new)
        self.top_k = torch.zeros(max_batch, dtype=torch.int64, **new)
        self.chain_query_start = torch.arange(max_batch + 1, dtype=torch.int32, **new)
        salts = [_ACCEPT_SALT + i for i in range(k)] + [_FINAL_SALT]  # verify's k + 1 draws
        self.verify_salts = torch.tensor(salts, dtype=torch.int64, **new)
        self.draft_salts = torch.arange(k, dtype=torch.int64, **new) + _DRAFT_SALT
        rows = max_batch * (k + 1)  # the fused argmax's settings for greedy rows
        self.greedy_settings = (torch.zeros(rows, dtype=torch.float32, **new),
                                torch.full((rows,), 0.5, dtype=torch.float64, **new))
        self.max_batch, self.k, self.device = max_batch, k, device
        self.draft_logp: torch.Tensor | None = None  # [max_batch, k, V], on first sampled use

    def load(self, seqs: list[Sequence]) -> None:
        params = [s.params for s in seqs]
        keys = np.array([signed64(s.noise_key ^ _SPEC_KEY) for s in seqs], dtype=np.int64)
        host = [keys, np.array([s.num_prompt_tokens for s in seqs], dtype=np.int64),
                np.array([p.temperature for p in params], dtype=np.float32),
                np.array([p.top_p for p in params], dtype=np.float32),
                np.array([p.min_p for p in params], dtype=np.float32),
                np.array([p.top_k for p in params], dtype=np.int64)]
        targets = [self.keys, self.prompt_lens, self.temperature, self.top_p, self.min_p,
                   self.top_k]
        for target, view in zip(targets, upload_packed(host, self.device)):
            target[:len(seqs)].copy_(view, non_blocking=True)

    def params(self, size: int, kind: RowKind) -> _Params:
        return _Params(kind, self.temperature[:size], self.top_k[:size], self.top_p[:size],
                       self.min_p[:size])

    def draft_buffer(self, vocab: int) -> torch.Tensor:
        if self.draft_logp is None:
            self.draft_logp = torch.zeros(self.max_batch, self.k, vocab, dtype=torch.float32,
                                          device=self.device)
        return self.draft_logp


class _Tail:
    """The device work after the verify forward (see the module docstring)."""

    def __init__(self, speculator: MTPSpeculator, rows: _StaticRows, kind: RowKind):
        self.spec, self.rows, self.kind, self.key = speculator, rows, kind, ("spec", kind)
        # Triton kernels: greedy rows take the fused sampling pass's argmax
        self.fused_argmax = rows.greedy_settings if speculator.fused else None

    def __call__(self, graphs: DecodeGraphs, hidden: torch.Tensor, size: int) -> torch.Tensor:
        k1 = self.spec.k + 1
        tokens = size * k1
        starts = graphs.positions[:tokens].view(size, k1)[:, 0]
        params = self.rows.params(size, self.kind)
        counters = starts + 1 - self.rows.prompt_lens[:size]  # output tokens so far
        out = self._verify(graphs, hidden, size, params, counters)
        mtp = self.spec.run_mtp(hidden, out.token_ids.clamp(min=0).view(-1),
                                graphs.positions[:tokens], graphs.meta(k1, size))
        previous = mtp.view(size, k1, -1)[torch.arange(size, device=hidden.device),
                                          out.num_accepted]
        live = graphs.slot_mapping[:tokens].view(size, k1)[:, 0] >= 0
        drafts = self._chain(graphs, previous, size, params, counters + out.num_accepted + 1,
                             starts + out.num_accepted + 1, live)
        packed = torch.cat([out.token_ids.double(), out.logprobs.double(),
                            out.num_accepted[:, None].double(), drafts.double()], dim=1)
        _write_next_inputs(graphs, size, out, drafts, starts, live)
        return packed

    def _verify(self, graphs, hidden, size, params: _Params, counters):
        k, k1 = self.spec.k, self.spec.k + 1
        drafts = graphs.input_ids[:size * k1].view(size, k1)[:, 1:]
        if self.kind.all_greedy:
            tokens, logprobs = self._argmax(hidden)
            return greedy_verify(tokens.view(size, k1), logprobs.view(size, k1), drafts)
        target = row_logprobs(self.spec.model, hidden, params.repeated(k1), self.spec.fused)
        target = target.view(size, k1, -1)
        uniforms = step_uniforms(self.rows.keys[:size], counters, self.rows.verify_salts,
                                 self.spec.fused)  # [size, k1]
        draft_logp = self.rows.draft_buffer(target.shape[-1])[:size]
        return verify(target, draft_logp, drafts, uniforms[:, :k], uniforms[:, k],
                      params.greedy, any_greedy=self.kind.any_greedy, fused=self.spec.fused)

    def _chain(self, graphs, previous, size, params: _Params, counters, first, live):
        """k drafts per row; the MTP layer runs k - 1 times, one row per sequence, at
        positions first, first + 1, ... (padded rows: position 0, no KV write)."""
        k, bs = self.spec.k, graphs.block_size
        tables = graphs.block_tables[:size]
        arange = torch.arange(size, device=previous.device)
        uniforms = None if self.kind.all_greedy else step_uniforms(  # [size, k]: 1 per draft
            self.rows.keys[:size], counters, self.rows.draft_salts, self.spec.fused)
        buffer = None if self.kind.all_greedy else \
            self.rows.draft_buffer(self.spec.model.spec.vocab_size)
        drafts = []
        for j in range(k):
            if self.kind.all_greedy:
                token = self._argmax(previous)[0]
            else:  # the distribution goes straight into the draft buffer
                token, _ = draft_rows(self.spec.model, previous, params, uniforms[:, j],
                                      self.spec.fused, out=buffer[:size, j])
            drafts.append(token)
            if j + 1 == k:
                break
            positions = torch.where(live, first + j, 0)
            slots = tables[arange, positions // bs].long() * bs + positions % bs
            meta = AttentionMetadata(torch.where(live, slots, -1),
                                     self.rows.chain_query_start[:size + 1],
                                     (positions + 1).int(), tables, max_query_len=1,
                                     max_context_len=graphs.max_context_len)
            previous = self.spec.run_mtp(previous, token, positions, meta)
        return torch.stack(drafts, dim=1)

    def _argmax(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's argmax per row and its log-softmax value."""
        logits = self.spec.model.compute_logits(hidden, as_float32=self.fused_argmax is None)
        return greedy_pick(logits, self.fused_argmax)


def _write_next_inputs(graphs: DecodeGraphs, size: int, out, drafts: torch.Tensor,
                       starts: torch.Tensor, live: torch.Tensor) -> None:
    """The same rows' next verify step, written over the static inputs (after everything
    in this step has read them): the final emitted token and the k new drafts, at the
    positions after the accepted run, their KV slots from the block tables as loaded
    (positions whose block is not there yet get slot -1; the host chains a step only
    after growing the tables for it), padded rows as load() pads them."""
    k1 = drafts.shape[1] + 1
    bs, tables = graphs.block_size, graphs.block_tables[:size]
    rows = torch.arange(size, device=drafts.device)
    first = starts + out.num_accepted + 1
    positions = first[:, None] + torch.arange(k1, device=drafts.device)
    index = positions // bs
    blocks = tables.gather(1, index.clamp(max=tables.shape[1] - 1)).long()
    slots = torch.where(live[:, None] & (index < tables.shape[1]) & (blocks >= 0),
                        blocks * bs + positions % bs, -1)
    ids = torch.cat([out.token_ids[rows, out.num_accepted][:, None], drafts], dim=1)
    tokens = size * k1
    graphs.input_ids[:tokens].copy_(torch.where(live[:, None], ids, 0).view(-1))
    graphs.positions[:tokens].copy_(torch.where(live[:, None], positions, 0).view(-1))
    graphs.slot_mapping[:tokens].copy_(slots.view(-1))
    graphs.context_lens[:size].copy_(torch.where(live, first + k1, k1).int())


@dataclass
class FusedLaunch:
    """A fused step on its way: its packed result is being copied to the host."""

    seqs: list[Sequence]
    size: int  # the padded batch size of its graph
    kind: RowKind
    host: torch.Tensor  # [B, 2k + 4] float64, pinned on CUDA
    done: torch.cuda.Event | None  # recorded after the copy (CUDA only)
    successor_ready: bool = False  # the core grew the blocks its tail's next step needs
    padding_rows: frozenset[int] = frozenset()  # rows of finished sequences, run as padding


class FusedSpeculation:
    """Runs a verify-only batch as one tailed graph replay; see the module docstring."""

    def __init__(self, speculator: MTPSpeculator):
        self.spec = speculator
        self._rows: _StaticRows | None = None
        self._graphs: DecodeGraphs | None = None
        self._tails: dict[RowKind, _Tail] = {}
        self._seqs: list[Sequence] = []  # the last step's rows
        self._views: list[BufferedDraft | None] = []  # the drafts handed to them
        self._kind: RowKind | None = None  # of those rows
        self.num_steps = 0

    def launch(self, graphs: DecodeGraphs, inputs, seqs: list[Sequence]) -> FusedLaunch:
        """Start a batch in which every sequence verifies k drafts; inputs: the runner's
        device inputs of the step. resolve() gives its (verified, proposals)."""
        _, kind = self._prepare(graphs, seqs)
        size = graphs.load(self.spec.k + 1, inputs.input_ids, inputs.positions,
                           inputs.slot_mapping, inputs.context_lens, inputs.block_tables)
        return self._run(graphs, size, seqs, kind)

    def can_chain(self, graphs: DecodeGraphs, launched: FusedLaunch) -> bool:
        return graphs is self._graphs and graphs.has_tail_graph(
            self._tail(launched.kind), self.spec.k + 1, launched.size)

    def chain(self, graphs: DecodeGraphs, launched: FusedLaunch, block_tables: torch.Tensor,
              finished_rows: np.ndarray) -> FusedLaunch:
        """The next verify step of launched's sequences, started before launched is read
        back: it runs on the inputs launched's tail wrote (see _write_next_inputs) with
        the block tables given (grown by the caller). Results of sequences that launched
        finishes are to be dropped. finished_rows: rows of sequences already finished,
        turned into padding rows (no KV writes; the tail keeps them so)."""
        batch, width = block_tables.shape
        graphs.block_tables[:batch, :width].copy_(block_tables, non_blocking=True)
        padding = frozenset(finished_rows.tolist())
        if padding - launched.padding_rows:
            new_rows = np.array(sorted(padding - launched.padding_rows), dtype=np.int64)
            graphs.pad_rows(upload_packed([new_rows], graphs.input_ids.device)[0],
                            launched.size, self.spec.k + 1)
        self.spec.forget_drafts()
        successor = self._run(graphs, launched.size, launched.seqs, launched.kind)
        successor.padding_rows = padding
        return successor

    def resolve(self, launched: FusedLaunch):
        """(verified, proposals) of a launched step (waits for its copy: the one sync)."""
        if launched.done is not None:
            launched.done.synchronize()
        return self._results(launched.seqs, launched.host.numpy(), self._rows, launched.kind)

    def _run(self, graphs: DecodeGraphs, size: int, seqs: list[Sequence],
             kind: RowKind) -> FusedLaunch:
        packed = graphs.run_tail(self._tail(kind), self.spec.k + 1, size)[:len(seqs)]
        self.num_steps += 1
        if packed.device.type != "cuda":
            return FusedLaunch(seqs, size, kind, packed.clone(), None)
        host = pinned_copy(packed)
        done = torch.cuda.Event()
        done.record()
        return FusedLaunch(seqs, size, kind, host, done)

    def _prepare(self, graphs: DecodeGraphs, seqs: list[Sequence]):
        if self._graphs is not graphs:  # new graphs (e.g. after wake_up): new buffers
            self._graphs, self._tails, self._seqs = graphs, {}, []
            self._rows = _StaticRows(graphs.max_batch, self.spec.k, graphs.input_ids.device)
        rows = self._rows
        same_rows = len(seqs) == len(self._seqs) and all(
            a is b for a, b in zip(seqs, self._seqs))
        if not same_rows:
            self._copy_out_leavers(seqs)
            rows.load(seqs)
            self._kind = RowKind.of(seqs)
        kind = self._kind
        if not kind.all_greedy and not (same_rows and all(
                s.draft_logprobs is v for s, v in zip(seqs, self._views))):
            # drafts proposed by the eager path, or rows moved: gather them (stack first,
            # as the sources may be rows of the buffer itself)
            stacked = torch.stack([draft_distributions(s.draft_logprobs) for s in seqs])
            rows.draft_buffer(stacked.shape[-1])[:len(seqs)].copy_(stacked)
        self.spec.forget_drafts()
        return rows, kind

    def _copy_out_leavers(self, seqs: list[Sequence]) -> None:
        """Sequences of the last step left out of this one keep their drafts' buffer rows,
        which this step overwrites: give them copies."""
        staying = {id(s) for s in seqs}
        for seq, view in zip(self._seqs, self._views):
            if view is not None and id(seq) not in staying and seq.draft_logprobs is view:
                seq.draft_logprobs = view.tensor().clone()

    def _tail(self, kind: RowKind) -> _Tail:
        tail = self._tails.get(kind)
        if tail is None:
            tail = self._tails[kind] = _Tail(self.spec, self._rows, kind)
        return tail

    def _results(self, seqs, host: np.ndarray, rows: _StaticRows, kind: RowKind):
        k1 = self.spec.k + 1
        accepted = host[:, 2 * k1].astype(np.int64).tolist()
        tokens = host[:, :k1].astype(np.int64).tolist()
        logprobs = host[:, k1:2 * k1].tolist()
        drafts = host[:, 2 * k1 + 1:].astype(np.int64).tolist()
        views = [None] * len(seqs) if kind.all_greedy else \
            [BufferedDraft(rows.draft_logp, i) for i in range(len(seqs))]
        verified = [Verified(s, tokens[i][:accepted[i] + 1], logprobs[i][:accepted[i] + 1],
                             accepted[i]) for i, s in enumerate(seqs)]
        proposals = [Proposal(s, drafts[i], views[i]) for i, s in enumerate(seqs)]
        self._seqs, self._views = list(seqs), views
        return verified, proposals
