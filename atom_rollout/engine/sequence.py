"""Sequence: one sample's tokens, KV blocks and outputs as it moves through the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..sampler import SamplingParams


PLACEHOLDER = -1  # an output token sampled on the device, not yet read back


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request of n samples fans out into n sequences; a ``score`` request
    is a sequence that only needs the logprobs of its given response tokens."""

    seq_id: int
    request_id: str
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_num_tokens: int  # prompt + max_tokens, capped at max_model_len
    noise_key: int
    is_score: bool = False
    score_temperature: float = 1.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1  # this sequence's row in BlockManager.tables while it holds blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    cacheable: bool = True  # False once its KV mixes weight versions
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    score_pieces: list = field(default_factory=list)  # score mode: logprob chunks
    version_spans: list[list[int]] = field(default_factory=list)  # [version, start, end)
    draft_tokens: list[int] = field(default_factory=list)  # speculative, not yet verified
    draft_logprobs: object = None  # [k, V] tensor: the processed draft distributions
    num_drafts_proposed: int = 0
    num_drafts_accepted: int = 0
    stop_ids: frozenset[int] | None = None  # stop tokens plus EOS unless ignored; set by the core
    # Async scheduling: output tokens sampled by launched steps but not yet read back sit
    # at the end of token_ids as PLACEHOLDER; the newest one is row last_sample_row of the
    # newest launched step's sampled tokens (the device feeds it to the next step).
    num_placeholders: int = 0
    last_sample_row: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_placeholders

    @property
    def num_known_output_tokens(self) -> int:
        return self.num_known_tokens - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens (drafts included) whose KV this sequence still has to compute."""
        return self.num_tokens + len(self.draft_tokens) - self.num_computed_tokens

    def clear_drafts(self) -> None:
        self.draft_tokens, self.draft_logprobs = [], None

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def first_logit_position(self) -> int:
        """Positions from here on must be computed this time (not served from cache)."""
        return self.num_prompt_tokens - 1 if self.is_score else self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float, weight_version: int) -> None:
        self.token_ids.append(token_id)
        self._record(logprob, weight_version)

    def append_tokens(self, token_ids: list[int], logprobs: list[float],
                      weight_version: int) -> None:
        """append_token for each, in one go (a speculative step's emitted tokens)."""
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)
        self._extend_span(len(logprobs), weight_version)

    def add_placeholder(self, sample_row: int) -> None:
        self.token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1
        self.last_sample_row = sample_row

    def resolve_placeholder(self, token_id: int, logprob: float, weight_version: int) -> None:
        """The oldest placeholder becomes the token read back for it."""
        index = len(self.token_ids) - self.num_placeholders
        self.token_ids[index] = token_id
        self.num_placeholders -= 1
        self._record(logprob, weight_version)

    def drop_placeholders(self) -> None:
        """A finished sequence forgets tokens sampled after its end."""
        if self.num_placeholders:
            del self.token_ids[len(self.token_ids) - self.num_placeholders:]
            self.num_placeholders = 0
            self.num_computed_tokens = min(self.num_computed_tokens, len(self.token_ids))

    def _record(self, logprob: float, weight_version: int) -> None:
        """Logprob and version span of the newest known output token."""
        self.logprobs.append(logprob)
        self._extend_span(1, weight_version)

    def _extend_span(self, count: int, weight_version: int) -> None:
        """The version spans after the newest ``count`` logprobs (one per known output
        token) came from weights of ``weight_version``."""
        end = len(self.logprobs)
        spans = self.version_spans
        if spans and spans[-1][0] == weight_version:
            spans[-1][2] = end
        else:
            spans.append([weight_version, end - count, end])
