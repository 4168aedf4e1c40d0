"""MTP speculative decoding inside a step: verify last step's drafts, then draft anew.

Per sequence the MTP layer keeps its own KV (one extra layer in the same block tables);
its row at position i pairs the target's hidden state at i with the token at i + 1 and
predicts the token at i + 2. After the target forward of a step, every position whose
next token is now known (prompt tokens, the sampled token, accepted drafts and the token
emitted after them) gets its MTP row ("catch-up"); the last row proposes the first draft
and k - 1 single-row MTP steps chain the rest. Verification is exact rejection sampling
(sampler/speculative.py) on the same processed distributions the drafts were drawn from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import AttentionMetadata, KernelOps
from ..sampler.noise import row_uniforms, signed64
from ..sampler.processing import processed_logprobs
from ..sampler.sampler import inverse_cdf
from ..sampler.speculative import verify
from .sequence import Sequence

_SPEC_KEY = 0x2545F4914F6CDD1D  # separates speculative draws from ordinary sampling
_DRAFT_SALT, _ACCEPT_SALT, _FINAL_SALT = 0, 8, 15


@dataclass
class Verified:
    seq: Sequence
    token_ids: list[int]
    logprobs: list[float]
    num_accepted: int


@dataclass
class Proposal:
    seq: Sequence
    token_ids: list[int]
    logprobs: torch.Tensor  # [k, V] processed draft distributions


class MTPSpeculator:
    """Host syncs per step: one for the verification result, one for the new drafts.
    Every other host -> device copy is non-blocking (pinned memory)."""

    def __init__(self, model, ops: KernelOps, mtp_kv, num_draft: int, block_size: int,
                 device: torch.device):
        self.model, self.ops, self.kv = model, ops, mtp_kv
        self.layer = model.mtp.layers[0]
        self.k, self.block_size, self.device = num_draft, block_size, device

    def verify(self, hidden: torch.Tensor, rows: list[tuple[Sequence, int]]) -> list[Verified]:
        if not rows:
            return []
        seqs = [seq for seq, _ in rows]
        k1 = self.k + 1
        logits = self.model.compute_logits(
            self._select(hidden, [r + i for _, r in rows for i in range(k1)]))
        target = self._processed(logits, _RowParams(seqs, self, k1)).view(len(seqs), k1, -1)
        drafts = self._tensor([s.draft_tokens for s in seqs], torch.int64)
        counters = [s.num_output_tokens for s in seqs]
        accept_u = torch.stack([self._uniforms(seqs, counters, _ACCEPT_SALT + i)
                                for i in range(self.k)], dim=1)
        out = verify(target, torch.stack([s.draft_logprobs for s in seqs]), drafts, accept_u,
                     self._uniforms(seqs, counters, _FINAL_SALT), self._greedy(seqs))
        host = torch.cat([out.token_ids.double(), out.logprobs.double(),
                          out.num_accepted[:, None].double()], dim=1).cpu()  # one sync
        tokens = host[:, :k1].long().tolist()
        logprobs, accepted = host[:, k1:2 * k1].tolist(), host[:, -1].long().tolist()
        return [Verified(s, tokens[i][:accepted[i] + 1], logprobs[i][:accepted[i] + 1],
                         accepted[i]) for i, s in enumerate(seqs)]

    def propose(self, hidden: torch.Tensor, catch_up: list[tuple], drafting: list[Sequence],
                next_counter: dict[int, int]) -> list[Proposal]:
        """catch_up: (seq, first flat row, first position, next token ids) per sequence;
        drafting: the sequences (a subset, in catch_up order) that need k drafts."""
        if not catch_up:
            return []
        out = self._catch_up(hidden, catch_up)
        last_row, ends = {}, 0
        for seq, _, start, nxt in catch_up:
            ends += len(nxt)
            last_row[id(seq)] = (ends - 1, start + len(nxt) - 1)
        if not drafting:
            return []
        previous = self._select(out, [last_row[id(s)][0] for s in drafting])
        positions = [last_row[id(s)][1] + 1 for s in drafting]
        counters = [next_counter[id(s)] for s in drafting]
        params = _RowParams(drafting, self, 1)
        tokens, logps = [], []
        for j in range(self.k):
            logp = self._processed(self.model.compute_logits(previous), params)
            token = self._draw(logp, drafting, counters, _DRAFT_SALT + j)
            tokens.append(token)
            logps.append(logp)
            if j + 1 < self.k:
                previous = self._chain_step(previous, token, drafting, [p + j for p in positions])
        token_lists = torch.stack(tokens, dim=1).tolist()  # the step's second sync
        stacked = torch.stack(logps, dim=1)
        return [Proposal(s, token_lists[i], stacked[i]) for i, s in enumerate(drafting)]

    def _catch_up(self, hidden, catch_up) -> torch.Tensor:
        rows, positions, next_ids, counts, tables = [], [], [], [], []
        for seq, row0, start, nxt in catch_up:
            rows += range(row0, row0 + len(nxt))
            positions += range(start, start + len(nxt))
            next_ids += nxt
            counts.append(len(nxt))
            tables.append(seq.block_table)
        return self._mtp(self._select(hidden, rows), self._tensor(next_ids, torch.int64),
                         positions, counts, tables)

    def _chain_step(self, previous, token, seqs, positions) -> torch.Tensor:
        return self._mtp(previous, token, positions, [1] * len(seqs),
                         [s.block_table for s in seqs])

    def _mtp(self, previous, next_ids: torch.Tensor, positions, counts, tables) -> torch.Tensor:
        """One MTP layer forward; next_ids is already on the device."""
        bs = self.block_size
        ends, cumulative = [], [0]
        for count in counts:
            cumulative.append(cumulative[-1] + count)
            ends.append(positions[cumulative[-1] - 1] + 1)
        slots = []
        for i, count in enumerate(counts):
            for p in positions[cumulative[i]:cumulative[i + 1]]:
                slots.append(tables[i][p // bs] * bs + p % bs)
        width = max(len(t) for t in tables)
        padded = [t + [-1] * (width - len(t)) for t in tables]
        meta = AttentionMetadata(*(self._tensor(v, d) for v, d in (
            (slots, torch.int64), (cumulative, torch.int32), (ends, torch.int32),
            (padded, torch.int32))), max_query_len=max(counts), max_context_len=max(ends))
        embeds = self.model.model.embed_tokens(next_ids)
        return self.layer(self.ops, previous, embeds, self._tensor(positions, torch.int64),
                          self.model.cos_sin, self.kv, meta)

    def _processed(self, logits: torch.Tensor, params: "_RowParams") -> torch.Tensor:
        """Processed log-probs per row (greedy rows: the plain log-softmax)."""
        if params.all_greedy:
            return torch.log_softmax(logits, dim=-1)
        logp = processed_logprobs(logits, params.temperature, params.top_k, params.top_p,
                                  params.min_p, params.use_sort, params.use_min_p)
        greedy = (params.temperature == 0)[:, None]
        return torch.where(greedy, torch.log_softmax(logits, dim=-1), logp)

    def _draw(self, logp, seqs, counters, salt) -> torch.Tensor:
        if all(s.params.greedy for s in seqs):
            return logp.argmax(dim=-1)
        token = inverse_cdf(logp, self._uniforms(seqs, counters, salt))
        return torch.where(self._greedy(seqs), logp.argmax(dim=-1), token)

    def _uniforms(self, seqs, counters, salt) -> torch.Tensor:
        if all(s.params.greedy for s in seqs):  # greedy rows never read their uniforms
            return torch.full((len(seqs),), 0.5, dtype=torch.float64, device=self.device)
        keys = torch.tensor([signed64(s.noise_key ^ _SPEC_KEY) for s in seqs], dtype=torch.int64)
        steps = torch.tensor([c * 16 + salt for c in counters], dtype=torch.int64)
        return self._upload(row_uniforms(keys, steps))

    def _greedy(self, seqs) -> torch.Tensor:
        return self._tensor([s.params.greedy for s in seqs], torch.bool)

    def _select(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows]; a leading run 0..n-1 (a whole verify batch) is a free view."""
        if rows == list(range(len(rows))):
            return hidden[:len(rows)]
        return hidden[self._tensor(rows, torch.int64)]

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return self._upload(torch.tensor(values, dtype=dtype))

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        # A pageable copy would synchronise the stream; pinned + non_blocking does not.
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)


class _RowParams:
    """Per-row processing parameters of some sequences, each row repeated ``repeat`` times."""

    def __init__(self, seqs: list[Sequence], speculator: MTPSpeculator, repeat: int):
        params = [s.params for s in seqs]
        self.all_greedy = all(p.greedy for p in params)
        self.use_sort = any(p.top_k > 0 or p.top_p < 1 for p in params)
        self.use_min_p = any(p.min_p > 0 for p in params)
        if self.all_greedy:
            return

        def per_row(values, dtype):
            return speculator._tensor([v for v in values for _ in range(repeat)], dtype)
        self.temperature = per_row([p.temperature for p in params], torch.float32)
        self.top_k = per_row([p.top_k for p in params], torch.int64)
        self.top_p = per_row([p.top_p for p in params], torch.float32)
        self.min_p = per_row([p.min_p for p in params], torch.float32)
