"""CUDA graphs for decode-shaped steps: captured once per (query length, padded batch
size), replayed.

A step in which every sequence adds the same number q of tokens has fixed shapes given
its batch size: q = 1 is a plain decode step, q = k + 1 a speculative verify step (the
last verified token plus k drafts). The whole forward is one graph replay; q = 1 graphs
also run the LM head, and with ``keep_hidden`` every graph returns its final hidden
states (the MTP speculator needs them for verify logits and its catch-up). A "tail" (see
run_with_tail) extends a graph with work on the forward's hidden states, for example a
whole speculative step; tailed graphs are captured on first use, and a tail may write
the next step's inputs into the static buffers for run_tail to replay on. Smaller
batches are padded up to the next captured size: padded sequences write no KV (slot -1),
attend to q slots of block 0 and their outputs are dropped. All graphs share one memory
pool. Without CUDA, run() executes the same padded forward eagerly (for CPU tests). On
the Triton backend one kernel loads a step into the static inputs (kernels/triton/
step_inputs.py); elsewhere a few torch copies do.
"""
from __future__ import annotations

import torch

from ..kernels import AttentionMetadata, KernelOps
from ..models import DecoderForCausalLM
from .token_feed import TokenFeed


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: DecoderForCausalLM, ops: KernelOps, kv_caches, max_batch: int,
                 max_context_len: int, block_size: int, device: torch.device,
                 query_lens: tuple[int, ...] = (1,), keep_hidden: bool = False):
        """max_context_len: the longest KV a sequence can reach (drafts included); it
        bounds the block tables and is the graphs' attention max_context_len."""
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.sizes = capture_sizes(max_batch)
        self.query_lens, self.keep_hidden = tuple(sorted(set(query_lens))), keep_hidden
        self.max_context_len, self.block_size = max_context_len, block_size
        self.use_graphs = device.type == "cuda"
        max_tokens = max_batch * max(self.query_lens)
        new = dict(device=device)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, **new)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, **new)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, **new)
        self.query_start_loc = {q: torch.arange(max_batch + 1, dtype=torch.int32, **new) * q
                                for q in self.query_lens}
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, **new)
        self.block_tables = torch.zeros(max_batch, -(-max_context_len // block_size),
                                        dtype=torch.int32, **new)
        # keyed by (query length, padded batch size, tail key or None)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple, object] = {}
        self._pool = None  # the memory pool every graph shares
        # load()'s one-launch kernel (kernels/triton/step_inputs.py), or None: torch copies
        self.step_loader = _step_loader(ops) if self.use_graphs else None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, query_len: int, batch: int) -> bool:
        return query_len in self.query_lens and batch <= self.max_batch

    def padded_size(self, batch: int) -> int:
        """The captured batch size a batch of ``batch`` sequences runs in."""
        return next(s for s in self.sizes if s >= batch)

    def meta(self, query_len: int, size: int) -> AttentionMetadata:
        """The attention metadata of a (query length, padded size) forward."""
        return AttentionMetadata(self.slot_mapping[:size * query_len],
                                 self.query_start_loc[query_len][:size + 1],
                                 self.context_lens[:size], self.block_tables[:size],
                                 max_query_len=query_len, max_context_len=self.max_context_len)

    def _forward(self, query_len: int, size: int, tail=None):
        tokens = size * query_len
        hidden = self.model(self.ops, self.input_ids[:tokens], self.positions[:tokens],
                            self.kv_caches, self.meta(query_len, size))
        if tail is not None:
            return tail(self, hidden, size)
        logits = self.model.compute_logits(hidden, as_float32=False, ops=self.ops) \
            if query_len == 1 else None
        return (hidden if self.keep_hidden else None), logits

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.use_graphs:
            return
        for q in reversed(self.query_lens):  # largest first: later graphs reuse its pool
            self.context_lens.fill_(q)  # padded sequences see q keys of block 0
            for size in reversed(self.sizes):
                self._forward(q, size)  # compiles kernels, warms cuBLAS
                self._capture((q, size, None), q, size, None)
        torch.cuda.synchronize()

    def recapture(self) -> None:
        """Drop every graph (tailed ones too) and capture the plain ones again in a fresh
        pool, e.g. after the kernel backend's settings changed (benchmarks)."""
        self.graphs.clear()
        self.outputs.clear()
        self._pool = None  # the old graphs' memory may still be referenced
        self.capture()

    def _capture(self, key: tuple, query_len: int, size: int, tail) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[key] = self._forward(query_len, size, tail)
        self._pool = graph.pool()
        self.graphs[key] = graph

    def run(self, query_len: int, input_ids: torch.Tensor, positions: torch.Tensor,
            slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
            feed: TokenFeed | None = None):
        """Replay for a batch, given as device tensors, in which every sequence has
        query_len new tokens (feed: tokens of the previous launch to feed to its input
        ids). Returns (hidden [B * q, H] or None, logits [B, V] or None): hidden with
        keep_hidden, logits for q = 1. Both are overwritten by the next run."""
        batch, tokens = context_lens.shape[0], context_lens.shape[0] * query_len
        size = self.load(query_len, input_ids, positions, slot_mapping, context_lens,
                         block_tables, feed)
        if self.use_graphs:
            self.graphs[query_len, size, None].replay()
            hidden, logits = self.outputs[query_len, size, None]
        else:
            hidden, logits = self._forward(query_len, size)
        return (None if hidden is None else hidden[:tokens],
                None if logits is None else logits[:batch])

    def run_with_tail(self, tail, query_len: int, input_ids: torch.Tensor,
                      positions: torch.Tensor, slot_mapping: torch.Tensor,
                      context_lens: torch.Tensor, block_tables: torch.Tensor):
        """Like run, then ``tail(graphs, hidden, padded size)`` inside the same graph;
        returns what the tail returns (rows of the padded batch)."""
        size = self.load(query_len, input_ids, positions, slot_mapping, context_lens,
                         block_tables)
        return self.run_tail(tail, query_len, size)

    def run_tail(self, tail, query_len: int, size: int):
        """The tailed forward over the static inputs as they stand: loaded by load(), or
        written there by the previous replay's tail. One graph per (query_len, size,
        tail.key), captured on first use: that first call runs eagerly (its result is
        this call's) and then records the graph, so a tail that updates state the next
        step reads is never run twice for one step."""
        key = (query_len, size, tail.key)
        if not self.use_graphs:
            return self._forward(query_len, size, tail)
        if key in self.graphs:
            self.graphs[key].replay()
            return self.outputs[key]
        result = self._forward(query_len, size, tail)
        self._capture(key, query_len, size, tail)
        return result

    def has_tail_graph(self, tail, query_len: int, size: int) -> bool:
        """Whether run_tail replays (True off CUDA, where every call runs eagerly)."""
        return not self.use_graphs or (query_len, size, tail.key) in self.graphs

    def load(self, query_len: int, input_ids, positions, slot_mapping, context_lens,
             block_tables, feed: TokenFeed | None = None) -> int:
        """Copies a batch into the static inputs (feeding it feed's tokens), pads it;
        returns the padded size."""
        batch = context_lens.shape[0]
        size = self.padded_size(batch)
        if self.step_loader is not None:
            self.step_loader(
                (self.input_ids, self.positions, self.slot_mapping, self.context_lens,
                 self.block_tables),
                (input_ids, positions, slot_mapping, context_lens, block_tables), size,
                query_len, self.block_size,
                None if feed is None else (feed.sources, feed.tokens))
            return size
        if feed is not None:
            feed.apply(input_ids)
        tokens, padded = batch * query_len, size * query_len
        self.input_ids[:tokens].copy_(input_ids, non_blocking=True)
        self.positions[:tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:tokens].copy_(slot_mapping, non_blocking=True)
        self.context_lens[:batch].copy_(context_lens, non_blocking=True)
        self.block_tables[:batch, :block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if size > batch:
            self._pad(batch, size, query_len, tokens, padded)
        return size

    def pad_rows(self, rows: torch.Tensor, size: int, query_len: int) -> None:
        """Turn these rows (int64, on the device) of the loaded inputs into padding rows,
        as load() pads a batch: no KV write (slot -1), token 0 at position 0, a context of
        query_len. Their block tables are the caller's."""
        tokens = size * query_len
        for buffer, value in ((self.slot_mapping, -1), (self.positions, 0),
                              (self.input_ids, 0)):
            buffer[:tokens].view(size, query_len).index_fill_(0, rows, value)
        self.context_lens[:size].index_fill_(0, rows, query_len)

    def _pad(self, batch: int, size: int, query_len: int, tokens: int, padded: int) -> None:
        self.slot_mapping[tokens:padded].fill_(-1)
        self.context_lens[batch:size].fill_(query_len)
        # Column 0 always holds a real block (every table has one); wider reads need more.
        blocks = -(-query_len // self.block_size)
        if blocks > 1:
            self.block_tables[batch:size, :blocks].fill_(0)


def _step_loader(ops: KernelOps):
    """The Triton backend's one-launch load_step_inputs, else None."""
    if ops.name != "triton":
        return None
    from ..kernels.triton.step_inputs import load_step_inputs  # decorates its kernel
    return load_step_inputs
