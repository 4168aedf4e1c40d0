"""The per-step attention metadata every kernel backend reads."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class AttentionMetadata:
    """Describes one step's flat token batch against the paged KV cache.

    Tokens of a step are laid out sequence after sequence (``query_start_loc``).
    Sequence ``b`` owns ``query_lens[b]`` new tokens whose KV is written to
    ``slot_mapping`` before attention; they are the last tokens of its
    ``context_lens[b]``-long context, whose KV lives in the blocks listed in
    ``block_tables[b]`` (padded with -1). A row of a prefill chunk with a cached
    prefix and a decode token are the same case with different lengths.
    """

    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    context_lens: torch.Tensor  # [B] int32, KV length after this step's writes
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 padded
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @cached_property
    def longest_first(self) -> torch.Tensor:
        """[B] int32 sequence indices by descending context length (ties by index),
        computed once per step on first use, for kernels that schedule long
        sequences first."""
        return torch.argsort(self.context_lens, descending=True, stable=True).to(torch.int32)
