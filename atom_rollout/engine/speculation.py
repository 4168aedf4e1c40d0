"""MTP speculative decoding inside a step: verify last step's drafts, then draft anew.

Per sequence the MTP layer keeps its own KV (one extra layer in the same block tables);
its row at position i pairs the target's hidden state at i with the token at i + 1 and
predicts the token at i + 2. After the target forward of a step, every position whose
next token is now known (prompt tokens, the sampled token, accepted drafts and the token
emitted after them) gets its MTP row ("catch-up"); the last row proposes the first draft
and k - 1 single-row MTP steps chain the rest. Verification is exact rejection sampling
(sampler/speculative.py) on the same processed distributions the drafts were drawn from.

This is the eager path, for steps of mixed shapes; a step in which every sequence
verifies k drafts runs as one CUDA graph instead (fused_speculation.py), drawing the
same tokens. Host cost per step here: at most one host->device copy before the
verification readback
(its uniforms, see verify) and one after it (the catch-up's and the whole draft chain's
metadata and uniforms, see _DraftPlan); per-sequence settings are uploaded once per batch
composition (_RowParams).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import AttentionMetadata, KernelOps
from ..sampler.noise import row_uniforms_np, signed64
from ..sampler.processing import processed_logprobs
from ..sampler.speculative import blocked_inverse_cdf, verify
from .packing import upload_packed
from .sequence import Sequence

_SPEC_KEY = 0x2545F4914F6CDD1D  # separates speculative draws from ordinary sampling
_DRAFT_SALT, _ACCEPT_SALT, _FINAL_SALT = 0, 8, 15


@dataclass
class Verified:
    seq: Sequence
    token_ids: list[int]
    logprobs: list[float]
    num_accepted: int


@dataclass
class Proposal:
    seq: Sequence
    token_ids: list[int]
    logprobs: torch.Tensor | BufferedDraft | None  # [k, V] processed draft distributions
    # (None: greedy rows, which need none)


class BufferedDraft:
    """A sequence's draft distributions kept as one row of a shared [B, k, V] buffer
    (engine/fused_speculation.py); its owner copies them out before it overwrites a row
    whose sequence still needs it."""

    __slots__ = ("buffer", "row")

    def __init__(self, buffer: torch.Tensor, row: int):
        self.buffer, self.row = buffer, row

    def tensor(self) -> torch.Tensor:
        return self.buffer[self.row]


def draft_distributions(value) -> torch.Tensor:
    """A sequence's draft_logprobs as a [k, V] tensor."""
    return value.tensor() if isinstance(value, BufferedDraft) else value


@dataclass
class StepTables:
    """The step's block tables, one row per sequence of the batch: host (for slots) and
    the device copy the target forward used."""

    host: np.ndarray  # [B, W] int32, -1 padded
    device: torch.Tensor
    seqs: list[Sequence]

    @classmethod
    def from_lists(cls, seqs: list[Sequence], device: torch.device) -> "StepTables":
        widths = [len(s.block_table) for s in seqs]
        host = np.full((len(seqs), max(widths)), -1, dtype=np.int32)
        for row, seq in enumerate(seqs):
            host[row, :widths[row]] = seq.block_table
        return cls(host, upload_packed([host], device)[0], list(seqs))

    def rows(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Table rows of ``seqs``, a subset in batch order; None when it is the whole batch."""
        if len(seqs) == len(self.seqs):
            return None
        index = {id(s): i for i, s in enumerate(self.seqs)}
        return np.array([index[id(s)] for s in seqs], dtype=np.int64)


class MTPSpeculator:
    """The eager path's host syncs per step: one for the verification result, one for the
    new drafts. Every host -> device copy is non-blocking (pinned memory)."""

    def __init__(self, model, ops: KernelOps, mtp_kv, num_draft: int, block_size: int,
                 device: torch.device):
        self.model, self.ops, self.kv = model, ops, mtp_kv
        self.fused = ops.name == "triton"  # Triton passes for argmax / processed rows
        self.layer = model.mtp.layers[0]
        self.k, self.block_size, self.device = num_draft, block_size, device
        self.tables: StepTables | None = None  # set by the runner before each step
        self._params: dict[int, _RowParams] = {}  # by repeat: rows of the last composition
        self._last: _LastDrafts | None = None

    def verify(self, hidden: torch.Tensor, rows: list[tuple[Sequence, int]]) -> list[Verified]:
        if not rows:
            return []
        seqs = [seq for seq, _ in rows]
        k, k1 = self.k, self.k + 1
        params = self._row_params(seqs, k1)
        drafts, draft_logp = self._last_drafts(seqs, params.kind.all_greedy)
        arrays = self._verify_arrays(rows, seqs, params, drafts is None)
        views = dict(zip(arrays, upload_packed(list(arrays.values()), self.device))) \
            if arrays else {}
        selected = hidden[:len(rows) * k1] if "rows" not in views else hidden[views["rows"]]
        target = row_logprobs(self.model, selected, params, self.fused)
        if drafts is None:
            drafts = views["drafts"]
            draft_logp = None if params.kind.all_greedy else \
                torch.stack([draft_distributions(s.draft_logprobs) for s in seqs])
        uniforms = views.get("uniforms")  # [k + 1, R]: k accept draws, then the final one
        out = verify(target.view(len(seqs), k1, -1), draft_logp, drafts,
                     None if uniforms is None else uniforms[:k].t(),
                     None if uniforms is None else uniforms[k], params.greedy,
                     all_greedy=params.kind.all_greedy, any_greedy=params.kind.any_greedy,
                     fused=self.fused)
        host = torch.cat([out.token_ids.double(), out.logprobs.double(),
                          out.num_accepted[:, None].double()], dim=1).cpu().numpy()  # one sync
        tokens = host[:, :k1].astype(np.int64).tolist()
        logprobs, accepted = host[:, k1:2 * k1].tolist(), host[:, -1].astype(np.int64).tolist()
        return [Verified(s, tokens[i][:accepted[i] + 1], logprobs[i][:accepted[i] + 1],
                         accepted[i]) for i, s in enumerate(seqs)]

    def _verify_arrays(self, rows, seqs, params: "_RowParams",
                       need_drafts: bool) -> dict[str, np.ndarray]:
        """The host arrays verify uploads (in one copy)."""
        k1, arrays = self.k + 1, {}
        if any(row != i * k1 for i, (_, row) in enumerate(rows)):  # not a leading run
            arrays["rows"] = (np.array([r for _, r in rows], dtype=np.int64)[:, None]
                              + np.arange(k1)).ravel()
        if need_drafts:
            arrays["drafts"] = np.array([s.draft_tokens for s in seqs], dtype=np.int64)
        if not params.kind.all_greedy:  # greedy rows never read their uniforms
            counters = np.array([s.num_output_tokens for s in seqs], dtype=np.int64)
            salts = np.array([_ACCEPT_SALT + i for i in range(self.k)] + [_FINAL_SALT])
            arrays["uniforms"] = params.uniforms(counters, salts)
        return arrays

    def _last_drafts(self, seqs, all_greedy: bool):
        """(drafts [R, k], draft logprobs [R, k, V]) still on the device when these rows
        hold exactly the last proposals; (None, None) otherwise."""
        last, self._last = self._last, None
        if last is None or len(last.token_lists) != len(seqs) or any(
                s.draft_tokens is not t for s, t in zip(seqs, last.token_lists)):
            return None, None
        return last.tokens, None if all_greedy else last.logprobs

    def forget_drafts(self) -> None:
        """Drop the last proposals' tensors (e.g. their sequences finished)."""
        self._last = None

    def propose(self, hidden: torch.Tensor, catch_up: list[tuple], drafting: list[Sequence],
                next_counter: dict[int, int]) -> list[Proposal]:
        """catch_up: (seq, first flat row, first position, next token ids) per sequence;
        drafting: the sequences (a subset, in catch_up order) that need k drafts."""
        self._last = None
        if not catch_up:
            return []
        tables, self.tables = self.tables, None
        if tables is None or len(tables.seqs) < len(catch_up):
            tables = StepTables.from_lists([c[0] for c in catch_up], self.device)
        params = self._row_params(drafting, 1) if drafting else None
        plan = _DraftPlan(self, tables, catch_up, drafting, next_counter, params)
        previous = self._catch_up(hidden, plan)
        if not drafting:
            return []
        if plan.previous_rows is not None:
            previous = previous[plan.previous_rows]
        tokens, logps = [], []
        for j in range(self.k):
            token, logp = draft_rows(self.model, previous, params,
                                     None if plan.uniforms is None else plan.uniforms[j],
                                     self.fused)
            tokens.append(token)
            logps.append(logp)
            if j + 1 < self.k:
                previous = self._chain_step(previous, token, plan, j)
        drafts = torch.stack(tokens, dim=1)
        token_lists = drafts.tolist()  # the step's second sync
        stacked = None if params.kind.all_greedy else torch.stack(logps, dim=1)
        proposals = [Proposal(s, token_lists[i], None if stacked is None else stacked[i])
                     for i, s in enumerate(drafting)]
        self._last = _LastDrafts(token_lists, drafts, stacked)
        return proposals

    def _catch_up(self, hidden, plan: "_DraftPlan") -> torch.Tensor:
        selected = hidden[:plan.num_rows] if plan.rows is None else hidden[plan.rows]
        return self.run_mtp(selected, plan.next_ids, plan.positions, plan.meta)

    def _chain_step(self, previous, token, plan: "_DraftPlan", j: int) -> torch.Tensor:
        return self.run_mtp(previous, token, plan.chain_positions[j], plan.chain_meta[j])

    def run_mtp(self, previous, next_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """One MTP layer forward; every input is already on the device."""
        embeds = self.model.model.embed_tokens(next_ids)
        return self.layer(self.ops, previous, embeds, positions, self.model.cos_sin, self.kv,
                          meta)

    def _row_params(self, seqs: list[Sequence], repeat: int) -> "_RowParams":
        """Cached while the same sequences come in the same order."""
        cached = self._params.get(repeat)
        if cached is None or cached.seqs != seqs:
            cached = self._params[repeat] = _RowParams(seqs, repeat, self.device)
        return cached


@dataclass(frozen=True)
class RowKind:
    """The host flags of a set of rows that decide which processing runs (and which
    graph variant a fused step replays)."""

    all_greedy: bool
    any_greedy: bool
    use_sort: bool  # some row filters by top-k or top-p
    use_min_p: bool

    @classmethod
    def of(cls, seqs: list[Sequence]) -> "RowKind":
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return cls(True, True, False, False)
        return cls(False, any(p.greedy for p in params),
                   any(p.top_k > 0 or p.top_p < 1 for p in params),
                   any(p.min_p > 0 for p in params))


def processed_rows(logits: torch.Tensor, params) -> torch.Tensor:
    """Processed log-probs per row (greedy rows: the plain log-softmax). params: a
    _RowParams or anything with its attributes (a RowKind and per-row device tensors)."""
    kind = params.kind
    if kind.all_greedy:
        return torch.log_softmax(logits, dim=-1)
    logp = processed_logprobs(logits, params.temperature, params.top_k, params.top_p,
                              params.min_p, kind.use_sort, kind.use_min_p)
    if not kind.any_greedy:
        return logp
    return torch.where(params.greedy_rows, torch.log_softmax(logits, dim=-1), logp)


def row_logprobs(model, hidden: torch.Tensor, params, fused: bool) -> torch.Tensor:
    """processed_rows of the LM head's logits for hidden's rows. fused (Triton kernels):
    kinds without top-k, top-p or min-p take one pass over the logits in the model dtype
    (kernels/triton/scaled_log_softmax.py; a greedy row's temperature 0 counts as 1,
    which is its plain log-softmax)."""
    if not _one_pass(params.kind, fused):
        return processed_rows(model.compute_logits(hidden), params)
    from ..kernels.triton.scaled_log_softmax import scaled_log_softmax
    return scaled_log_softmax(model.compute_logits(hidden, as_float32=False), params.temperature)


def draft_rows(model, hidden: torch.Tensor, params, uniforms: torch.Tensor | None,
               fused: bool = False, out: torch.Tensor | None = None):
    """One draft token per row of hidden and the processed distribution it was drawn
    from: the argmax for greedy rows, else an inverse-CDF draw. All-greedy rows need no
    distribution (verification only compares argmaxes): (tokens, None). fused: kinds
    without top-k, top-p or min-p draw with the fused sampling pass (the same inverse CDF
    over the same distribution, read from the logits in the model dtype). out: a float32
    [R, V] view the distribution is written to (and returned)."""
    if params.kind.all_greedy:
        return model.compute_logits(hidden).argmax(dim=-1), None
    if _one_pass(params.kind, fused):
        from ..kernels.triton.sampling import fused_sample
        from ..kernels.triton.scaled_log_softmax import scaled_log_softmax
        logits = model.compute_logits(hidden, as_float32=False)
        token, _, _ = fused_sample(logits, params.temperature, params.min_p, uniforms, None,
                                   False, use_min_p=False)  # greedy rows: the argmax
        return token, scaled_log_softmax(logits, params.temperature, out=out)
    logp = processed_rows(model.compute_logits(hidden), params)
    token = blocked_inverse_cdf(logp.exp(), uniforms)
    if params.kind.any_greedy:
        token = torch.where(params.greedy, logp.argmax(dim=-1), token)
    return token, logp if out is None else out.copy_(logp)


def _one_pass(kind: "RowKind", fused: bool) -> bool:
    """Rows the Triton passes serve: sampled kinds without top-k, top-p or min-p."""
    return fused and not (kind.all_greedy or kind.use_sort or kind.use_min_p)


@dataclass
class _LastDrafts:
    """The last proposals' device tensors, for the next verify of the same rows."""

    token_lists: list[list[int]]  # each proposal's drafts (identity marks the proposal)
    tokens: torch.Tensor  # [R, k] int64
    logprobs: torch.Tensor | None  # [R, k, V]; None when every row is greedy


class _RowParams:
    """Per-row processing parameters of some sequences, each row repeated ``repeat`` times,
    on the device; rebuilt only when the sequences change."""

    def __init__(self, seqs: list[Sequence], repeat: int, device: torch.device):
        self.seqs = list(seqs)
        params = [s.params for s in seqs]
        self.kind = RowKind.of(seqs)
        if self.kind.all_greedy:
            self.greedy = torch.ones(len(seqs), dtype=torch.bool, device=device)
            return
        self.keys = np.array([signed64(s.noise_key ^ _SPEC_KEY) for s in seqs], dtype=np.int64)

        def per_row(values, dtype):
            return np.repeat(np.array(values, dtype=dtype), repeat)
        self.temperature, self.top_k, self.top_p, self.min_p = upload_packed([
            per_row([p.temperature for p in params], np.float32),
            per_row([p.top_k for p in params], np.int64),
            per_row([p.top_p for p in params], np.float32),
            per_row([p.min_p for p in params], np.float32)], device)
        self.greedy_rows = (self.temperature == 0)[:, None]
        self.greedy = self.greedy_rows[::repeat, 0]

    def uniforms(self, counters: np.ndarray, salts: np.ndarray) -> np.ndarray:
        """[len(salts), R] float64: row r's draw at counter * 16 + salt."""
        steps = counters[None, :] * 16 + salts[:, None]
        keys = np.broadcast_to(self.keys, steps.shape)
        return row_uniforms_np(keys.ravel(), steps.ravel()).reshape(steps.shape)


class _DraftPlan:
    """Everything the catch-up and the draft chain need from the host, uploaded in one
    copy: the catch-up's rows, tokens and attention metadata, and for each of the k - 1
    chained steps (one row per drafting sequence at consecutive positions) its
    positions and metadata, plus the k draws' uniforms."""

    def __init__(self, speculator: MTPSpeculator, tables: StepTables, catch_up: list[tuple],
                 drafting: list[Sequence], next_counter: dict[int, int],
                 params: _RowParams | None):
        bs, k = speculator.block_size, speculator.k
        counts = np.array([len(c[3]) for c in catch_up], dtype=np.int64)
        starts = np.array([c[2] for c in catch_up], dtype=np.int64)
        row0s = np.array([c[1] for c in catch_up], dtype=np.int64)
        ends = np.cumsum(counts)
        self.num_rows = total = int(ends[-1])
        flat = np.arange(total, dtype=np.int64)
        shift = np.repeat(ends - counts, counts)  # each token's offset inside its sequence
        positions = np.repeat(starts, counts) + flat - shift
        rows = np.repeat(row0s, counts) + flat - shift
        table_rows = tables.rows([c[0] for c in catch_up])
        host_tables = tables.host if table_rows is None else tables.host[table_rows]
        seq_of_token = np.repeat(np.arange(len(catch_up)), counts)
        arrays = {
            "next_ids": np.fromiter(itertools.chain.from_iterable(c[3] for c in catch_up),
                                    dtype=np.int64, count=total),
            "positions": positions,
            "slots": _slots(host_tables, seq_of_token, positions, bs),
            "query_start": np.concatenate([[0], ends]).astype(np.int32),
            "context_lens": (starts + counts).astype(np.int32)}
        if not np.array_equal(rows, flat):
            arrays["rows"] = rows
        if table_rows is not None:
            arrays["table_rows"] = table_rows
        max_context = [int(arrays["context_lens"].max())]
        if drafting:
            max_context += self._chain_arrays(arrays, speculator, tables, catch_up, drafting,
                                              ends, host_tables, next_counter, params)
        views = dict(zip(arrays, upload_packed(list(arrays.values()), speculator.device)))
        self._unpack(views, tables, int(counts.max()), max_context, len(drafting), k)

    @staticmethod
    def _chain_arrays(arrays, speculator, tables, catch_up, drafting, ends, host_tables,
                      next_counter, params) -> list[int]:
        """Adds the chain's arrays; returns each chained step's max context length."""
        bs, k = speculator.block_size, speculator.k
        if len(drafting) == len(catch_up):
            index = np.arange(len(catch_up))
        else:
            where = {id(c[0]): i for i, c in enumerate(catch_up)}
            index = np.array([where[id(s)] for s in drafting], dtype=np.int64)
        last_rows = ends[index] - 1
        if not np.array_equal(last_rows, np.arange(len(drafting))):
            arrays["previous_rows"] = last_rows
        first = arrays["positions"][last_rows] + 1  # the first draft's position
        steps = np.arange(k - 1, dtype=np.int64)[:, None]
        chain_positions = first[None, :] + steps  # [k - 1, R]
        arrays["chain_positions"] = chain_positions
        seq_rows = np.broadcast_to(index, chain_positions.shape)
        arrays["chain_slots"] = _slots(host_tables, seq_rows, chain_positions, bs)
        arrays["chain_context_lens"] = (chain_positions + 1).astype(np.int32)
        arrays["chain_query_start"] = np.arange(len(drafting) + 1, dtype=np.int32)
        if len(drafting) != len(catch_up):  # shorter than the batch: rows is not None
            arrays["chain_table_rows"] = tables.rows(drafting)
        if not params.kind.all_greedy:
            counters = np.array([next_counter[id(s)] for s in drafting], dtype=np.int64)
            salts = np.array([_DRAFT_SALT + j for j in range(k)])
            arrays["uniforms"] = params.uniforms(counters, salts)
        return [int(first.max()) + j + 1 for j in range(k - 1)]

    def _unpack(self, views: dict[str, torch.Tensor], tables: StepTables, max_query: int,
                max_context: list[int], num_drafting: int, k: int) -> None:
        self.next_ids, self.positions = views["next_ids"], views["positions"]
        self.rows = views.get("rows")
        device_tables = tables.device
        if "table_rows" in views:
            device_tables = device_tables[views["table_rows"]]
        self.meta = AttentionMetadata(views["slots"], views["query_start"],
                                      views["context_lens"], device_tables,
                                      max_query_len=max_query, max_context_len=max_context[0])
        self.previous_rows = views.get("previous_rows")
        self.uniforms = views.get("uniforms")
        if not num_drafting:
            return
        chain_tables = device_tables  # the catch-up's, unless fewer sequences draft
        if "chain_table_rows" in views:
            chain_tables = tables.device[views["chain_table_rows"]]
        self.chain_positions = views["chain_positions"]
        self.chain_meta = [
            AttentionMetadata(views["chain_slots"][j], views["chain_query_start"],
                              views["chain_context_lens"][j], chain_tables, max_query_len=1,
                              max_context_len=max_context[1 + j])
            for j in range(k - 1)]


def _slots(tables: np.ndarray, seq_rows: np.ndarray, positions: np.ndarray,
           block_size: int) -> np.ndarray:
    """Flat KV slots of (sequence row, position) pairs."""
    blocks = tables[seq_rows, positions // block_size].astype(np.int64)
    return blocks * block_size + positions % block_size
