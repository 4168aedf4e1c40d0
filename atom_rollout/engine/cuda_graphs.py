"""CUDA graphs for decode steps: captured once per padded batch size, replayed.

A decode step (every sequence adds one token) has fixed shapes given its batch
size, so the whole forward plus the LM head is one graph replay. Smaller batches
are padded up to the next captured size; padded rows write no KV (slot -1) and
attend to one cached slot, and their logits are dropped.
"""
from __future__ import annotations

import torch

from ..kernels import AttentionMetadata, KernelOps
from ..models import DecoderForCausalLM


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: DecoderForCausalLM, ops: KernelOps, kv_caches, max_batch: int,
                 max_model_len: int, block_size: int, device: torch.device):
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.sizes = capture_sizes(max_batch)
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        new = dict(device=device)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, **new)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, **new)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, **new)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, **new)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, **new)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, **new)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:size], self.query_start_loc[:size + 1],
                                 self.context_lens[:size], self.block_tables[:size],
                                 max_query_len=1, max_context_len=self.max_model_len)
        hidden = self.model(self.ops, self.input_ids[:size], self.positions[:size],
                            self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: later graphs reuse its pool
            self._forward(size)  # compiles kernels, warms cuBLAS
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            context_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Replay for a decode batch given as host tensors; returns logits [B, V]."""
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[batch:size].fill_(-1)
        self.context_lens[:batch].copy_(context_lens, non_blocking=True)
        self.context_lens[batch:size].fill_(1)
        self.block_tables[:batch, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:batch]
