"""Validation of prompts and responses shared by the front ends that cross a process
boundary: a bad request must fail here, with the field named, not inside the core."""
from __future__ import annotations

from collections.abc import Callable

import torch


def check_token_ids(ids, field: str, vocab_size: int, encode: Callable[[str], list[int]],
                    allow_empty: bool = False) -> list[int]:
    """Token ids as a list of ints in [0, vocab_size); a string goes through ``encode``."""
    if isinstance(ids, str):
        ids = encode(ids)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not hasattr(ids, "__iter__"):
        raise ValueError(f"{field}: expected a string or a list of token ids, "
                         f"got {type(ids).__name__}")
    ids = list(ids)
    if not ids and not allow_empty:
        raise ValueError(f"{field}: empty prompt")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
           or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{field}: token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")
    return ids


def check_length(field: str, length: int, reserve: int, max_model_len: int) -> None:
    if length + reserve > max_model_len:
        raise ValueError(f"{field}: length {length} leaves no room under "
                         f"max_model_len={max_model_len}")


def check_params(params, num_speculative_tokens: int) -> None:
    """SamplingParams this engine configuration cannot serve."""
    if not num_speculative_tokens:
        return
    for field in ("logprobs", "return_raw_logprobs", "min_tokens"):
        if getattr(params, field):
            raise ValueError(f"{field}: not available with speculative decoding yet")
