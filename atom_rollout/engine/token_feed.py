"""The overlapped-token feed (async scheduling): a step launched while the one before is
still in flight computes tokens that step sampled, which are placeholders on the host.
The host names, per input token, the row of the previous launch's sampled tokens that
replaces it, or -1 where the uploaded id stands; the device applies it (every input token
is read from one place, so nothing races)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scheduler import ScheduledBatch


@dataclass
class TokenFeed:
    sources: torch.Tensor  # [T] int64 on the device: a row of tokens, or -1
    tokens: torch.Tensor  # [R] int64: the previous launch's sampled tokens

    def apply(self, input_ids: torch.Tensor) -> None:
        """Write the fed tokens into input_ids [T] with torch ops (the Triton step loader
        of CUDA graphs does it in its own launch)."""
        # a -1 source indexes the last row: read, never kept
        torch.where(self.sources < 0, input_ids, self.tokens[self.sources], out=input_ids)


def placeholder_sources(batch: ScheduledBatch) -> np.ndarray | None:
    """Per input token of the batch a row of the previous launch's sampled tokens, or -1;
    None when no sequence's last token is a placeholder. Such a sequence computes exactly
    that token this step, so its row is the last of its chunk."""
    seqs = batch.seqs
    rows = np.fromiter((s.last_sample_row if s.num_placeholders else -1 for s in seqs),
                       dtype=np.int64, count=len(seqs))
    if not (rows >= 0).any():
        return None
    if batch.is_decode:
        return rows
    sources = np.full(sum(batch.num_new_tokens), -1, dtype=np.int64)
    sources[np.cumsum(batch.num_new_tokens) - 1] = rows
    return sources
