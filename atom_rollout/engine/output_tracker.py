"""Which requests the core process is running, and what each front end has not seen yet."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import SampleDelta
from .sequence import Sequence


@dataclass
class TrackedRequest:
    seqs: list[Sequence]
    stream: bool
    sent: list[int]  # output tokens already sent, per sample

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class OutputTracker:
    def __init__(self) -> None:
        self.requests: dict[str, TrackedRequest] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.requests

    def add(self, request_id: str, seqs: list[Sequence], stream: bool) -> None:
        self.requests[request_id] = TrackedRequest(seqs, stream, [0] * len(seqs))

    def seqs(self, request_ids=None) -> list[Sequence]:
        ids = self.requests if request_ids is None else request_ids
        return [s for rid in ids if rid in self.requests for s in self.requests[rid].seqs]

    def collect(self, weight_version: int) -> list[SampleDelta]:
        """Deltas for everything new since the last call; forgets finished requests."""
        deltas = []
        for request_id, request in list(self.requests.items()):
            for j, seq in enumerate(request.seqs):
                known = seq.num_known_output_tokens  # placeholders are not tokens yet
                if seq.is_finished or (request.stream and known > request.sent[j]):
                    if request.sent[j] >= 0:
                        deltas.append(_delta(seq, request.sent[j], known, weight_version))
                    request.sent[j] = -1 if seq.is_finished else known
            if request.finished:
                del self.requests[request_id]
        return deltas


def _delta(seq: Sequence, start: int, end: int, weight_version: int) -> SampleDelta:
    params = seq.params
    delta = SampleDelta(seq.request_id, seq.sample_index, seq.output_token_ids[start:end],
                        seq.logprobs[start:end],
                        seq.raw_logprobs[start:end] if params.return_raw_logprobs else None,
                        seq.top_logprobs[start:end] if params.logprobs else None)
    if seq.is_finished:
        delta.finish_reason = seq.finish_reason or "abort"
        delta.version_spans = [tuple(span) for span in seq.version_spans]
        delta.weight_version = (delta.version_spans[-1][0] if delta.version_spans
                                else weight_version)
        delta.num_cached_tokens = seq.num_cached_tokens
        if seq.is_score:
            delta.token_ids, delta.logprobs = [], []
            delta.score = (torch.cat(seq.score_pieces).float().cpu() if seq.score_pieces
                           else torch.zeros(0, dtype=torch.float32))
    return delta
