"""EngineCore: the intake -> schedule -> execute -> postprocess loop."""
from __future__ import annotations

import contextlib
import functools
import os
import itertools
import random

import torch
from transformers import AutoConfig, GenerationConfig

from ..kernels import select_backend
from ..models import (WeightMap, build_model, init_dummy_weights, iter_checkpoint,
                      load_checkpoint)
from ..sampler import SamplingParams
from ..sampler.noise import sample_key
from ..weight_sync import IpcPayload, ReceivedUpdate, rebuild_ipc
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .kv_cache import allocate_kv_cache, num_kv_blocks
from .model_runner import Launched, ModelRunner, StepResult
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .prompt_check import check_params
from .speculation import MTPSpeculator
from .warmup import warm_up
from .weight_broadcast import WeightBroadcast


INFLIGHT_POLICIES = ("recompute", "keep", "abort")
_FINISHED = SequenceStatus.FINISHED
ASYNC_ENV_VAR = "ATOM_ROLLOUT_ASYNC_SCHEDULING"  # 0/1: the default of async_scheduling


def _device_guard(device: torch.device):
    """Make the engine's GPU current: Triton launches on the current device, which in a
    trainer process is usually another GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_engine_device(method):
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with _device_guard(self.device):
            return method(self, *args, **kwargs)
    return guarded


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device, self.dtype = config.torch_device(), config.torch_dtype()
        with _device_guard(self.device):
            self._build(config)

    def _build(self, config: EngineConfig) -> None:
        self.hf_config = AutoConfig.from_pretrained(config.model_dir)
        self.max_model_len = _max_model_len(self.hf_config, config.max_model_len)
        self.num_draft = config.num_speculative_tokens
        self.model, self.weight_map = self._load_model()
        self.ops = select_backend(self.device, config.kernel_backend)
        self.eos_token_ids = _eos_token_ids(self.hf_config, config.model_dir)
        self.runner = self._build_cache_and_runner()
        self.weight_version = 0
        self._finished_elsewhere: list[Sequence] = []  # e.g. aborted by a weight update
        self.weight_broadcast = WeightBroadcast(self.weight_map, list(self.model.parameters()),
                                                self.device)
        self.drafts_proposed, self.drafts_accepted_at = 0, [0] * self.num_draft
        self.async_scheduling = _use_async_scheduling(config, self.device)
        self._in_flight: Launched | None = None  # async scheduling: launched, not resolved
        self._seq_ids = itertools.count()
        self._rng = random.Random(self.config.seed)
        if _use_warmup(config, self.device):
            warm_up(self)

    def _load_model(self):
        model = build_model(self.hf_config)
        if self.num_draft and model.mtp is None:
            raise ValueError("num_speculative_tokens: the checkpoint has no MTP layers "
                             "(config.json num_nextn_predict_layers)")
        model.to(device=self.device, dtype=self.dtype)
        weight_map = WeightMap(model)
        if self.config.load_format == "dummy":
            init_dummy_weights(model, seed=self.config.seed or 0)
        else:
            load_checkpoint(weight_map, self.config.model_dir)
        # Drafts and their chain reach up to 2k positions past the verified tokens.
        model.init_rotary(self.max_model_len + 2 * self.num_draft, self.device)
        return model, weight_map

    def _build_cache_and_runner(self) -> ModelRunner:
        """KV cache (plus one layer for the MTP draft), block manager, scheduler, runner."""
        config, spec = self.config, self.model.spec
        kv_layers = spec.num_layers + (1 if self.num_draft else 0)
        num_blocks = num_kv_blocks(config, spec, self.max_model_len, self.device, self.dtype,
                                   kv_layers)
        self.kv_cache, kv_views = allocate_kv_cache(spec, num_blocks, config.block_size,
                                                    self.device, self.dtype, kv_layers)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching, self.num_draft)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        speculator = MTPSpeculator(self.model, self.ops, kv_views[-1], self.num_draft,
                                   config.block_size, self.device) if self.num_draft else None
        main_views = kv_views[:spec.num_layers]
        return ModelRunner(self.model, self.ops, main_views, config.block_size, self.device,
                           self.eos_token_ids, config.score_chunk_tokens,
                           self._decode_graphs(main_views), speculator)

    @property
    def asleep(self) -> bool:
        return self.runner is None

    @on_engine_device
    def sleep(self, offload_weights: bool = False) -> None:
        """Release the KV cache (and CUDA graphs), optionally moving the weights to host
        memory, so a colocated trainer can use the GPU; wake_up() restores both."""
        self.drain()
        if self.scheduler.has_work():
            raise RuntimeError("sleep: requests are still in flight; finish or abort them")
        self.runner = self.kv_cache = None
        self.weight_broadcast.release_scratch()
        if offload_weights:
            self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @on_engine_device
    def wake_up(self) -> None:
        if self.asleep:
            self.model.to(self.device)
            self.runner = self._build_cache_and_runner()

    def _decode_graphs(self, kv_views) -> DecodeGraphs | None:
        """Plain engines graph decode steps (1 token per sequence); speculative ones graph
        verify steps (k + 1 per sequence), the only uniform shape they run in practice:
        a sequence only decodes 1 token when its drafts were dropped for the token budget."""
        config, query_len = self.config, self.num_draft + 1
        max_batch = min(config.cuda_graph_max_batch, config.max_num_seqs,
                        config.max_num_batched_tokens // query_len)
        if self.device.type != "cuda" or config.enforce_eager or max_batch < 1:
            return None
        graphs = DecodeGraphs(self.model, self.ops, kv_views, max_batch,
                              self.max_model_len + 2 * self.num_draft, config.block_size,
                              self.device, query_lens=(query_len,),
                              keep_hidden=bool(self.num_draft))
        graphs.capture()
        return graphs

    @property
    def vocab_size(self) -> int:
        return self.model.spec.vocab_size

    def check_params(self, params: SamplingParams) -> None:
        """What this engine's configuration cannot serve (checked before anything is queued)."""
        check_params(params, self.num_draft)

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> list[Sequence]:
        self.check_params(params)
        max_num_tokens = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        seqs = [Sequence(next(self._seq_ids), request_id, j, list(prompt_ids), len(prompt_ids),
                         params, max_num_tokens, self._noise_key(params, j))
                for j in range(params.n)]
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def add_score(self, request_id: str, prompt_ids: list[int], response_ids: list[int],
                  temperature: float) -> Sequence:
        tokens = list(prompt_ids) + list(response_ids)
        seq = Sequence(next(self._seq_ids), request_id, 0, tokens, len(prompt_ids),
                       SamplingParams(max_tokens=1), len(tokens), 0, is_score=True,
                       score_temperature=temperature)
        self.scheduler.add(seq)
        return seq

    def _noise_key(self, params: SamplingParams, sample_index: int) -> int:
        if params.seed is None:
            return self._rng.getrandbits(64)
        return sample_key(params.seed, sample_index)

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    @on_engine_device
    def step(self) -> list[Sequence]:
        """One schedule + forward + sample; returns the sequences that finished. With async
        scheduling the step is launched and the previous one's tokens are read back and
        processed while it runs (its sampled tokens reach the host one call later)."""
        finished, self._finished_elsewhere = self._finished_elsewhere, []
        if not self.has_work():
            return finished
        if self.asleep:
            raise RuntimeError("the engine is asleep: call wake_up() first")
        if self.async_scheduling:
            return finished + self._step_overlapped()
        if self.num_draft and self.runner.graphs is not None:
            return finished + self._step_speculative()
        batch = self._schedule()
        result = self.runner.run(batch)
        return finished + self._advance(batch) + self._postprocess(result)

    def _schedule(self):
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("scheduler made no progress: the KV cache cannot hold the "
                               "next waiting sequence (this is a bug, please report it)")
        return batch

    def _step_overlapped(self) -> list[Sequence]:
        """Launch the next step before reading back the one in flight. Anything that
        would need the in-flight tokens on the host first (preemption, or nothing left to
        schedule until they are known) resolves it before scheduling."""
        finished, batch = [], None
        if self._in_flight is not None:
            batch = self.scheduler.schedule(overlapped=True)
            if batch.needs_room or not batch.seqs:  # it needs the in-flight tokens first
                finished, batch = self._resolve_in_flight(), None
        if batch is None:
            if not self.scheduler.has_work():
                return finished
            batch = self._schedule()
        launched = self.runner.launch(batch, overlapped=self._in_flight is not None)
        finished += self._advance(batch)
        for row, seq in enumerate(launched.seqs):
            seq.add_placeholder(row)
        finished += self._resolve_in_flight()
        self._in_flight = launched
        return finished

    def _step_speculative(self) -> list[Sequence]:
        """Verify steps of an unchanged batch run back to back: while one fused step is in
        flight the next is launched on the inputs its tail writes, then the first is read
        back. A sequence that finishes is seen one step late (its results in the chained
        step are dropped) and then stays in the chain as a padding row, until half the
        graph's rows are such rows; a waiting request ends the chain."""
        finished, launched = [], self._in_flight
        if launched is None:
            batch = self._schedule()
            ready = self.runner.is_verify_only(batch) and self._grow_ahead(batch.seqs)
            launched = self.runner.launch_speculative(batch)
            finished += self._advance(batch)
            if isinstance(launched, StepResult):
                return finished + self._postprocess(launched)
            launched.successor_ready = ready
        self._in_flight = None
        successor = self._chain(launched)
        finished += self._postprocess(self.runner.resolve(launched))
        if successor is not None:
            for seq in successor.seqs:
                if not seq.is_finished:
                    seq.num_computed_tokens += self.num_draft + 1
            self._in_flight = successor
        return finished

    def _chain(self, launched):
        """The next verify step of launched's sequences, or None where it may not run yet:
        one is left out or waiting, the blocks are not there, or finished sequences hold
        half the graph's rows (a smaller graph is then cheaper)."""
        scheduler = self.scheduler
        live = [seq for seq in launched.seqs if not seq.is_finished]
        if (not launched.successor_ready or len(live) != len(scheduler.running)
                or (scheduler.waiting and len(scheduler.running) < scheduler.max_num_seqs)
                or (len(live) < len(launched.seqs) and 2 * len(live) <= launched.size)):
            return None
        ready = self._grow_ahead(live)  # for the step after the chained one
        successor = self.runner.chain_speculative(launched, self.block_manager.tables)
        if successor is not None:
            successor.successor_ready = ready
        return successor

    def _grow_ahead(self, seqs: list[Sequence]) -> bool:
        """Blocks for two more verify steps past each sequence's computed tokens: a fused
        step's tail writes the KV slots of the step after it. False where the pool or the
        graphs' block tables (max_model_len + 2k positions) cannot hold them."""
        num_tokens, blocks = 2 * (self.num_draft + 1), self.block_manager
        reach = self.max_model_len + 2 * self.num_draft - blocks.lookahead_slots
        for seq in seqs:
            if (seq.num_computed_tokens + num_tokens > reach
                    or not blocks.grow_if_free(seq, num_tokens)):
                return False
        return True

    def _resolve_in_flight(self) -> list[Sequence]:
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return []
        return self._postprocess(self.runner.resolve(launched))

    def drain(self) -> list[Sequence]:
        """Finish the step in flight (async scheduling) so that every sampled token is on
        the host; the sequences it finished are returned by the next step()."""
        finished = self._resolve_in_flight()
        self._finished_elsewhere += finished
        return finished

    def _advance(self, batch) -> list[Sequence]:
        """Count the step's computed tokens; returns the score sequences now complete."""
        if batch.is_decode:
            for seq in batch.seqs:
                seq.num_computed_tokens += 1
            return []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        scored = [seq for seq in batch.seqs if seq.is_score
                  and seq.num_computed_tokens == seq.num_tokens]
        for seq in scored:
            self.scheduler.finish(seq, "stop")
        return scored

    def _postprocess(self, result: StepResult) -> list[Sequence]:
        finished, version = [], self.weight_version
        raw, top = result.raw_logprobs, result.top
        for row, (seq, token, logprob) in enumerate(zip(result.sampled_seqs, result.token_ids,
                                                         result.logprobs)):
            if seq.num_placeholders:
                seq.resolve_placeholder(token, logprob, version)
                known = len(seq.token_ids) - seq.num_placeholders
            elif seq.status is _FINISHED:
                continue  # ended (stop token, abort) while this step was in flight
            else:
                seq.append_token(token, logprob, version)
                known = len(seq.token_ids)
            if raw is not None:
                seq.raw_logprobs.append(raw[row])
            if top is not None:
                seq.top_logprobs.append(top[row])
            stops = seq.stop_ids if seq.stop_ids is not None else self._stop_ids(seq)
            # _stop_reason is None unless the token may stop or the length is reached
            if ((token in stops or known >= seq.max_num_tokens)
                    and self._finish_if_done(seq, token)):
                finished.append(seq)
        finished += self._accept_verified(result)
        return finished

    def _stop_ids(self, seq: Sequence) -> frozenset[int]:
        params = seq.params
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        seq.stop_ids = eos | frozenset(params.stop_token_ids)
        return seq.stop_ids

    def _accept_verified(self, result: StepResult) -> list[Sequence]:
        """Speculative steps: emitted tokens in order (stop checks on each), KV kept only
        up to the last verified token, then the next drafts."""
        finished, version, accepted_at = [], self.weight_version, self.drafts_accepted_at
        for verified in result.verified:
            seq = verified.seq
            if seq.is_finished:  # a chained step ran past its end: nothing to keep
                continue
            seq.clear_drafts()
            seq.num_drafts_proposed += self.num_draft
            seq.num_drafts_accepted += verified.num_accepted
            self.drafts_proposed += self.num_draft
            for position in range(verified.num_accepted):
                accepted_at[position] += 1
            stops = seq.stop_ids if seq.stop_ids is not None else self._stop_ids(seq)
            tokens = verified.token_ids
            if (len(seq.token_ids) + len(tokens) < seq.max_num_tokens
                    and stops.isdisjoint(tokens)):  # none of them can end the sequence
                seq.append_tokens(tokens, verified.logprobs, version)
            elif self._append_until_stop(seq, verified, stops, version):
                finished.append(seq)
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        any_finished = False
        for proposal in result.proposals:
            if proposal.seq.is_finished:
                any_finished = True
            else:
                proposal.seq.draft_tokens = proposal.token_ids
                proposal.seq.draft_logprobs = proposal.logprobs
        if any_finished:  # the speculator's copy would outlive the finished sequences
            self.runner.speculator.forget_drafts()
        return finished

    def _append_until_stop(self, seq: Sequence, verified, stops: frozenset[int],
                           version: int) -> bool:
        """Emitted tokens one by one with stop checks; True when one ended the sequence."""
        for token, logprob in zip(verified.token_ids, verified.logprobs):
            seq.append_token(token, logprob, version)
            # as in _postprocess: only these can make _stop_reason non-None
            if ((token in stops or len(seq.token_ids) >= seq.max_num_tokens)
                    and self._finish_if_done(seq, token)):
                return True
        return False

    def _finish_if_done(self, seq: Sequence, token: int) -> bool:
        reason = self._stop_reason(seq, token)
        if reason is not None:
            seq.drop_placeholders()  # tokens a later in-flight step sampled past the end
            self.scheduler.finish(seq, reason)
        return reason is not None

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_known_output_tokens > params.min_tokens:
            if token in params.stop_token_ids:
                return "stop"
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if seq.num_known_tokens >= seq.max_num_tokens:
            return "length"
        return None

    @on_engine_device
    def update_weights(self, named_tensors, version: int | None = None,
                       inflight: str = "recompute", partial: bool = True,
                       check_finite: bool = True) -> int:
        """Validate everything, then write in place, bump the version, drop every
        prefix-cache entry and apply the in-flight policy. Returns the version."""
        self.drain()
        _check_update_args(inflight, version)
        plan = self.weight_map.plan(named_tensors, partial=partial, check_finite=check_finite)
        WeightMap.apply(plan)
        return self._weights_changed(version, inflight)

    def _weights_changed(self, version: int | None, inflight: str) -> int:
        self.weight_version = self.weight_version + 1 if version is None else version
        self.block_manager.reset_prefix_cache()
        self._finished_elsewhere += self.scheduler.on_weights_changed(inflight)
        return self.weight_version

    @on_engine_device
    def update_weights_from_disk(self, path: str, **options) -> int:
        """Load a safetensors checkpoint directory in place (complete by default)."""
        options.setdefault("partial", False)
        return self.update_weights(list(iter_checkpoint(path)), **options)

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def reset_counters(self) -> None:
        """Zero what stats() counts (prefix-cache hits, preemptions, draft acceptance)."""
        self.block_manager.hit_tokens = self.block_manager.queried_tokens = 0
        self.scheduler.num_preemptions = 0
        self.drafts_proposed, self.drafts_accepted_at = 0, [0] * self.num_draft

    @on_engine_device
    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                         world_size: int, backend: str = "nccl", timeout_s: float = 600.0) -> None:
        """Join the trainer's standalone weight-broadcast group as rank ``rank_offset``
        (blocks until every rank has joined)."""
        self.weight_broadcast.join(master_address, master_port, rank_offset, world_size,
                                   backend, timeout_s)

    @on_engine_device
    def receive_update(self, timeout_s: float | None = None) -> ReceivedUpdate:
        """Block until one whole broadcast has arrived; touches no engine state."""
        return self.weight_broadcast.receive(timeout_s)

    @on_engine_device
    def receive_weights(self, timeout_s: float | None = None, inflight: str = "recompute",
                        partial: bool = True, check_finite: bool = True) -> int:
        """Receive one broadcast, writing each bucket into the model as it lands (see
        streamed_update.py); any failure leaves the old weights. No step may run until
        this returns. Returns the new version."""
        self.drain()
        _check_update_args(inflight, None)
        broadcast = self.weight_broadcast
        if not broadcast.can_stream():
            update = broadcast.receive(timeout_s)
            return self.update_weights(update.named_tensors, update.version, inflight,
                                       partial, check_finite)
        version = broadcast.receive_into_model(timeout_s, partial, check_finite)
        return self._weights_changed(version, inflight)

    @on_engine_device
    def update_weights_from_ipc(self, payload: IpcPayload, **options) -> int:
        """Colocated trainer: read its CUDA IPC buckets (see weight_sync.export_ipc)."""
        update = rebuild_ipc(payload, self.device.index)
        options.setdefault("version", update.version)
        return self.update_weights(update.named_tensors, **options)

    def abort(self, seqs: list[Sequence]) -> None:
        if any(not seq.is_finished for seq in seqs):
            self.drain()
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def stats(self) -> dict:
        blocks = self.block_manager
        return {"weight_version": self.weight_version,
                "num_kv_blocks": len(blocks.blocks), "free_kv_blocks": blocks.num_free_blocks,
                "prefix_cache_hit_tokens": blocks.hit_tokens,
                "prefix_cache_queried_tokens": blocks.queried_tokens,
                "num_preemptions": self.scheduler.num_preemptions,
                "num_speculative_tokens": self.num_draft,
                "drafts_proposed": self.drafts_proposed,
                "draft_acceptance_by_position": [
                    a / max(1, self.drafts_proposed // max(1, self.num_draft))
                    for a in self.drafts_accepted_at],
                "kernel_backend": self.ops.name}


def _use_warmup(config: EngineConfig, device: torch.device) -> bool:
    """Default: on for GPUs, where kernels compile on first use (a CPU engine runs
    torch ops or, in tests, the Triton interpreter, which has nothing to compile)."""
    return config.warmup if config.warmup is not None else device.type == "cuda"


def _use_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    """Default: on for plain engines on a GPU, where the host work of a step overlaps
    the GPU work of the one before; a CPU runs both on the same cores."""
    if config.async_scheduling is not None:
        return config.async_scheduling
    forced = os.environ.get(ASYNC_ENV_VAR)
    if forced in ("0", "1"):
        return forced == "1" and not config.num_speculative_tokens
    return device.type == "cuda" and not config.num_speculative_tokens


def _check_update_args(inflight: str, version: int | None) -> None:
    if inflight not in INFLIGHT_POLICIES:
        raise ValueError(f"inflight: {inflight!r} is not one of {INFLIGHT_POLICIES}")
    if version is not None and (not isinstance(version, int) or version < 0):
        raise ValueError(f"version: must be a non-negative integer, got {version!r}")


def _max_model_len(hf_config, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, window)  # beyond the window our full attention would differ
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's limit {limit}")
    return requested or limit


def _eos_token_ids(hf_config, model_dir: str) -> frozenset[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    try:
        ids = GenerationConfig.from_pretrained(model_dir).eos_token_id or ids
    except OSError:
        pass
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)
