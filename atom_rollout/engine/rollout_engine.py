"""RolloutEngine: the in-process front end trainers call."""
from __future__ import annotations

import itertools
import threading
from typing import Sequence as Seq

import torch
from tqdm import tqdm

from ..sampler import SamplingParams
from .config import EngineConfig
from .core import EngineCore
from .gc_pause import cyclic_gc_paused
from .outputs import RolloutOutput, SampleOutput
from .prompt_check import check_length, check_token_ids
from .sequence import Sequence


class RolloutEngine:
    """Generate n samples per prompt with exact logprobs, and score sequences.

    ``options`` are the fields of :class:`EngineConfig` (block_size,
    max_num_seqs, max_num_batched_tokens, max_model_len, num_kv_blocks, ...).
    """

    def __init__(self, model_dir: str, dtype: str = "auto", device: str = "auto", **options):
        self.config = EngineConfig.from_options(model_dir, dtype=dtype, device=device, **options)
        self.core = EngineCore(self.config)
        self._request_ids = itertools.count()
        self._tokenizer = None
        self._lock = threading.RLock()  # steps and weight updates never interleave

    @property
    def weight_version(self) -> int:
        return self.core.weight_version

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir)
        return self._tokenizer

    def generate_batch(self, prompts: Seq[Seq[int]] | Seq[str],
                       params: SamplingParams | Seq[SamplingParams] | None = None,
                       ) -> list[RolloutOutput]:
        """Sample ``params.n`` responses per prompt; outputs are in input order."""
        prompt_ids = self._validate_prompts(prompts)
        per_prompt = self._params_per_prompt(params, len(prompt_ids))
        for index, (ids, p) in enumerate(zip(prompt_ids, per_prompt)):
            self._check_length(f"prompts[{index}]", len(ids), reserve=1)
            self.core.check_params(p)
        requests = [(f"gen-{next(self._request_ids)}", ids, p)
                    for ids, p in zip(prompt_ids, per_prompt)]
        seqs = [self.core.add_request(*request) for request in requests]
        self._run([s for group in seqs for s in group], "rollout")
        return [RolloutOutput(rid, ids, [SampleOutput.from_sequence(s, self.weight_version)
                                         for s in group])
                for (rid, ids, _), group in zip(requests, seqs)]

    def score(self, prompt_ids: Seq[Seq[int]], response_ids: Seq[Seq[int]],
              temperature: float = 1.0) -> list[torch.Tensor]:
        """log p(response token | everything before it) for every response token,
        as one float32 CPU tensor per pair; logits are formed a chunk at a time."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"response_ids: {len(response_ids)} responses for "
                             f"{len(prompt_ids)} prompts")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        prompts = self._validate_prompts(prompt_ids, "prompt_ids")
        responses = [self._validate_ids(r, f"response_ids[{i}]", allow_empty=True)
                     for i, r in enumerate(response_ids)]
        for index, (p, r) in enumerate(zip(prompts, responses)):
            self._check_length(f"response_ids[{index}]", len(p) + len(r), reserve=0)
        seqs = [self.core.add_score(f"score-{next(self._request_ids)}", p, r, temperature)
                for p, r in zip(prompts, responses)]
        self._run(seqs, "score")
        return [torch.cat(s.score_pieces).float().cpu() if s.score_pieces
                else torch.zeros(0, dtype=torch.float32) for s in seqs]

    def stats(self) -> dict:
        return self.core.stats()

    def update_weights(self, named_tensors, version: int | None = None,
                       inflight: str = "recompute", partial: bool = True,
                       check_finite: bool = True) -> int:
        """Take new weights in place, between two steps; HF names as trainers hold
        them (wrapper prefixes stripped). Everything is validated before any write.
        inflight: "recompute" (running samples recompute their KV under the new
        weights), "keep" (they continue on old KV), "abort" (they end now)."""
        with self._lock:
            return self.core.update_weights(named_tensors, version, inflight, partial,
                                            check_finite)

    def update_weights_from_disk(self, path: str, **options) -> int:
        with self._lock:
            return self.core.update_weights_from_disk(path, **options)

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.core.reset_prefix_cache()

    def sleep(self, offload_weights: bool = False) -> None:
        """Free the KV cache (and, with offload_weights, move the weights to host memory)
        between rollouts; weight updates still work while asleep."""
        with self._lock:
            self.core.sleep(offload_weights)

    def wake_up(self) -> None:
        with self._lock:
            self.core.wake_up()

    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                         world_size: int, backend: str = "nccl", timeout_s: float = 600.0) -> None:
        """Join a trainer's WeightSender group (trainer rank 0, this engine rank_offset)."""
        self.core.init_weight_sync(master_address, master_port, rank_offset, world_size,
                                   backend, timeout_s)

    def receive_weights(self, timeout_s: float | None = None, stream: bool = True,
                        **options) -> int:
        """Wait for one whole broadcast and apply it like update_weights(**options); a
        failed or partial transfer changes nothing. stream=True writes each bucket as it
        lands (fastest; generation waits for the transfer). stream=False receives into
        staging buffers while generation goes on, then applies under the lock."""
        if stream:
            with self._lock:
                return self.core.receive_weights(timeout_s, **options)
        update = self.core.receive_update(timeout_s)
        with self._lock:
            return self.core.update_weights(update.named_tensors, update.version, **options)

    def update_weights_from_ipc(self, payload, **options) -> int:
        with self._lock:
            return self.core.update_weights_from_ipc(payload, **options)

    def _run(self, seqs: list[Sequence], desc: str) -> None:
        bar = tqdm(total=len(seqs), desc=desc, disable=not self.config.show_progress,
                   leave=False)
        pending = {id(s) for s in seqs}
        try:
            with cyclic_gc_paused():
                while pending:
                    with self._lock:
                        finished = self.core.step()
                    done = [id(s) for s in finished if id(s) in pending]
                    pending.difference_update(done)
                    bar.update(len(done))
        finally:
            bar.close()
            with self._lock:
                self.core.abort(seqs)  # no-op on success; frees everything on error

    def _validate_prompts(self, prompts, field: str = "prompts") -> list[list[int]]:
        if isinstance(prompts, (str, torch.Tensor)) or not hasattr(prompts, "__len__"):
            raise ValueError(f"{field}: expected a list of prompts, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError(f"{field}: empty list")
        return [self._validate_ids(p, f"{field}[{i}]") for i, p in enumerate(prompts)]

    def _validate_ids(self, ids, field: str, allow_empty: bool = False) -> list[int]:
        return check_token_ids(ids, field, self.core.vocab_size,
                               lambda text: self.tokenizer.encode(text), allow_empty)

    def _check_length(self, field: str, length: int, reserve: int) -> None:
        check_length(field, length, reserve, self.core.max_model_len)

    @staticmethod
    def _params_per_prompt(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params: expected one SamplingParams or a list of {count}")
        return params
