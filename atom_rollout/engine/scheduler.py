"""Continuous batching under a token budget, with chunked prefill and
preemption by recompute; a request is never dropped."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager, BlockTables
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes this step
    # Sequences that compute just their last token and sample the next (no drafts, not
    # scoring); when it is every sequence the runner takes its decode fast path.
    num_decode: int = 0
    tables: BlockTables | None = None  # the block manager's mirror of seq.block_table
    # Overlapped schedule only: a running sequence needed blocks that only preempting
    # another could free; the caller must finish the step in flight and schedule again.
    needs_room: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return 0 < len(self.seqs) == self.num_decode

    def add(self, seq: Sequence, num_new: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        if (num_new == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids)
                and not seq.draft_tokens and not seq.is_score):
            self.num_decode += 1


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, overlapped: bool = False) -> ScheduledBatch:
        """The next step's batch. overlapped: a step is still in flight, so its sampled
        tokens are placeholders; nothing is preempted (needs_room is set instead) and
        sequences whose in-flight token is their last are left out."""
        batch = ScheduledBatch([], [], tables=self.blocks.tables)
        budget, complete = self._schedule_running(batch, self.max_num_batched_tokens,
                                                  overlapped)
        if complete:  # every running sequence got its tokens: no preemption this step
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int,
                          overlapped: bool) -> tuple[int, bool]:
        grow_if_free = self.blocks.grow_if_free
        seqs, counts, fast, ending = batch.seqs, batch.num_new_tokens, 0, 0
        # _make_room only ever preempts sequences after this one, or this one (then we
        # stop), so iterating the live list is safe.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_placeholders and seq.num_tokens >= seq.max_num_tokens:
                ending += 1  # its in-flight token ends it: nothing left to compute
                continue
            num_new = len(seq.token_ids) + len(seq.draft_tokens) - seq.num_computed_tokens
            if num_new <= budget and not seq.is_score and grow_if_free(seq, num_new):
                seqs.append(seq)  # no preemption was needed: batch.add, inlined
                counts.append(num_new)
                fast += num_new == 1 and not seq.draft_tokens
                budget -= num_new
                continue
            num_new = self._make_room(seq, budget, overlapped)
            if not num_new:
                batch.needs_room = overlapped
                break
            batch.add(seq, num_new)
            budget -= num_new
        batch.num_decode += fast
        return budget, len(batch.seqs) + ending == len(self.running)

    def _make_room(self, seq: Sequence, budget: int, overlapped: bool = False) -> int:
        """Grow a running sequence's blocks for its next tokens, preempting the most
        recently admitted ones if needed; 0 when it was preempted itself (or, overlapped,
        when room was needed)."""
        if seq.draft_tokens and seq.num_pending_tokens > budget:
            seq.clear_drafts()  # a verify step is never split across steps
        num_new = min(seq.num_pending_tokens, budget)
        if overlapped and not self.blocks.can_grow(seq, num_new):
            return 0
        while not self.blocks.can_grow(seq, num_new) and self.running[-1] is not seq:
            self.preempt(self.running[-1])
        if not self.blocks.can_grow(seq, num_new):
            self.preempt(seq)
            return 0
        self.blocks.grow(seq, num_new)
        return num_new

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * self.blocks.block_size, budget)
            if not self.blocks.can_allocate(seq, hits, num_new):
                break
            self.blocks.allocate(seq, hits, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV; it recomputes from scratch later."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.cacheable = True  # recomputed KV is clean again
        seq.clear_drafts()
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def on_weights_changed(self, inflight: str) -> list[Sequence]:
        """Apply the in-flight policy of a weight update; returns aborted sequences."""
        if inflight == "recompute":
            for seq in reversed(self.running):
                self.preempt(seq)
        elif inflight == "keep":
            for seq in self.running:
                seq.cacheable = False  # its KV now mixes weight versions
        elif inflight == "abort":
            aborted = self.running + list(self.waiting)
            for seq in aborted:
                self.finish(seq, "abort")
            return aborted
        return []
