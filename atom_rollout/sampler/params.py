"""SamplingParams: what a trainer asks of one prompt, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one prompt and its ``n`` samples.

    ``temperature=0`` is greedy. Filters apply in the order temperature, top-k,
    top-p, min-p; a sampled token's logprob is the log of the probability it was
    drawn with under all of them (``return_raw_logprobs`` adds the plain
    log-softmax of the model's logits). Greedy samples report the plain
    log-softmax: their processed distribution is a point mass. ``seed`` makes a
    request's samples reproducible whatever else shares the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # k top alternatives per position
    return_raw_logprobs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for problem in _problems(self):
            raise ValueError(problem)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problems(p: SamplingParams):
    if not _is_int(p.n) or p.n < 1:
        yield f"n must be an integer >= 1, got {p.n!r}"
    if not isinstance(p.temperature, (int, float)) or not p.temperature >= 0:
        yield f"temperature must be >= 0, got {p.temperature!r}"
    if not _is_int(p.top_k) or p.top_k < 0:
        yield f"top_k must be -1, 0 (off) or a positive integer, got {p.top_k!r}"
    if not isinstance(p.top_p, (int, float)) or not 0 < p.top_p <= 1:
        yield f"top_p must be in (0, 1], got {p.top_p!r}"
    if not isinstance(p.min_p, (int, float)) or not 0 <= p.min_p <= 1:
        yield f"min_p must be in [0, 1], got {p.min_p!r}"
    if not _is_int(p.max_tokens) or p.max_tokens < 1:
        yield f"max_tokens must be an integer >= 1, got {p.max_tokens!r}"
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= max(p.max_tokens, 0):
        yield f"min_tokens must be in [0, max_tokens], got {p.min_tokens!r}"
    if not all(_is_int(t) and t >= 0 for t in p.stop_token_ids):
        yield f"stop_token_ids must be non-negative integers, got {p.stop_token_ids!r}"
    if p.seed is not None and not _is_int(p.seed):
        yield f"seed must be an integer or None, got {p.seed!r}"
    if p.logprobs is not None and (not _is_int(p.logprobs) or p.logprobs < 0):
        yield f"logprobs must be None or an integer >= 0, got {p.logprobs!r}"
