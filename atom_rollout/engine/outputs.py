"""What generate_batch returns: one RolloutOutput per prompt, n samples each."""
from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]  # processed: the distribution each token was drawn from
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int  # weights that produced the last token
    version_spans: list[tuple[int, int, int]]  # (version, start, end) over token_ids
    raw_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    num_drafts_proposed: int = 0  # speculative decoding: drafts verified for this sample
    num_drafts_accepted: int = 0

    @classmethod
    def from_sequence(cls, seq: Sequence, weight_version: int) -> "SampleOutput":
        spans = [tuple(span) for span in seq.version_spans]
        return cls(seq.output_token_ids, seq.logprobs, seq.finish_reason or "abort",
                   spans[-1][0] if spans else weight_version, spans,
                   seq.raw_logprobs if seq.params.return_raw_logprobs else None,
                   seq.top_logprobs if seq.params.logprobs else None, seq.num_cached_tokens,
                   seq.num_drafts_proposed, seq.num_drafts_accepted)


@dataclass
class RolloutOutput:
    request_id: str
    prompt_token_ids: list[int]
    samples: list[SampleOutput]
