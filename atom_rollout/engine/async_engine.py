"""AsyncRolloutEngine: the asyncio front end of an engine core running in its own process."""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable
from typing import Sequence as Seq

import torch

from ..sampler import SamplingParams
from .client import CoreClient
from .config import EngineConfig
from .outputs import RolloutOutput, SampleOutput
from .prompt_check import check_length, check_params, check_token_ids
from .protocol import EngineDeadError, SampleDelta


class AsyncRolloutEngine:
    """Like RolloutEngine, but the scheduler/model loop runs in a child process, so that
    tokenization, HTTP and Python bookkeeping overlap with the forward passes.

    ``options`` are the fields of :class:`EngineConfig`. Call ``shutdown()`` when done (it
    also happens on garbage collection and at interpreter exit).
    """

    def __init__(self, model_dir: str, dtype: str = "auto", device: str = "auto",
                 startup_timeout_s: float = 600.0, **options):
        options.setdefault("show_progress", False)
        self.config = EngineConfig.from_options(model_dir, dtype=dtype, device=device, **options)
        self.client = CoreClient(self.config, startup_timeout_s)
        self.info = self.client.info
        self._request_ids = itertools.count()
        self._tokenizer = None

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir)
            except (OSError, ValueError) as e:
                raise ValueError(f"prompt: the model directory has no usable tokenizer "
                                 f"({e}); send token ids") from None
        return self._tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_ids(self, prompt: str | Seq[int], field: str = "prompt") -> list[int]:
        """Validated token ids of a prompt (a string is tokenized)."""
        ids = check_token_ids(prompt, field, self.info.vocab_size, self._encode)
        check_length(field, len(ids), 1, self.info.max_model_len)
        return ids

    # ---- generation

    async def generate(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RolloutOutput:
        """All ``params.n`` samples of one prompt once they are done."""
        ids, params, request_id = self._prepare(prompt, params, request_id)
        samples: dict[int, _SampleBuilder] = {j: _SampleBuilder() for j in range(params.n)}
        async for deltas in self._run(request_id, ("add", request_id, ids, params, False),
                                      params.n):
            for delta in deltas:
                samples[delta.sample_index].add(delta)
        return RolloutOutput(request_id, ids, [samples[j].build() for j in range(params.n)])

    async def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[SampleDelta]:
        """New tokens of each sample as they are sampled; a sample's last delta has
        ``finish_reason`` set. Leaving the loop early aborts the request."""
        ids, params, request_id = self._prepare(prompt, params, request_id)
        async for deltas in self._run(request_id, ("add", request_id, ids, params, True),
                                      params.n):
            for delta in deltas:
                yield delta

    async def score(self, prompt_ids: Seq[int], response_ids: Seq[int],
                    temperature: float = 1.0) -> torch.Tensor:
        """log p(response token | everything before it), one float32 tensor."""
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        prompt = check_token_ids(prompt_ids, "prompt_ids", self.info.vocab_size,
                                 self._encode)
        response = check_token_ids(response_ids, "response_ids", self.info.vocab_size,
                                   self._encode, allow_empty=True)
        check_length("response_ids", len(prompt) + len(response), 0, self.info.max_model_len)
        request_id = f"score-{next(self._request_ids)}"
        result = None
        async for deltas in self._run(request_id, ("score", request_id, prompt, response,
                                                   float(temperature)), 1):
            result = deltas[-1]
        if result.score is None:
            raise RuntimeError(f"score request {request_id} was aborted")
        return result.score

    async def abort(self, request_id: str) -> None:
        """End a running request; its samples finish with finish_reason="abort"."""
        self.client.abort([request_id])

    def _prepare(self, prompt, params, request_id):
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        check_params(params, self.config.num_speculative_tokens)
        request_id = request_id or f"gen-{next(self._request_ids)}"
        return self.prompt_ids(prompt), params, request_id

    async def _run(self, request_id: str, message: tuple,
                   num_samples: int) -> AsyncIterator[list[SampleDelta]]:
        sink = _RequestSink(asyncio.get_running_loop(), num_samples)
        self.client.add_request(request_id, message, sink)
        try:
            while not sink.done:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                sink.count(item)
                yield item
        finally:
            if not sink.done and self.client.error is None:
                self.client.abort([request_id])  # cancelled or abandoned by the caller

    # ---- utility calls (run by the core between two steps)

    async def call(self, method: str, *args, **kwargs):
        """Call any public EngineCore method (or read an attribute) in the core process."""
        return await asyncio.wrap_future(self.client.call(method, *args, **kwargs))

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                             version: int | None = None, inflight: str = "recompute",
                             partial: bool = True, check_finite: bool = True) -> int:
        tensors = [(name, tensor.detach()) for name, tensor in named_tensors]
        return await self.call("update_weights", tensors, version, inflight, partial,
                               check_finite)

    async def update_weights_from_disk(self, path: str, **options) -> int:
        return await self.call("update_weights_from_disk", path, **options)

    async def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                               world_size: int, backend: str = "nccl") -> None:
        return await self.call("init_weight_sync", master_address, master_port, rank_offset,
                               world_size, backend)

    async def receive_weights(self, timeout_s: float | None = None) -> int:
        return await self.call("receive_weights", timeout_s)

    async def reset_prefix_cache(self) -> None:
        return await self.call("reset_prefix_cache")

    async def pause(self, mode: str = "abort") -> None:
        """abort: end in-flight requests; wait: return once they finished; keep: freeze
        them in place. New requests wait until resume()."""
        return await self.call("pause", mode)

    async def resume(self) -> None:
        return await self.call("resume")

    async def stats(self) -> dict:
        return await self.call("stats")

    async def weight_version(self) -> int:
        return await self.call("weight_version")

    def is_alive(self) -> bool:
        return self.client.error is None

    def shutdown(self) -> None:
        self.client.close()


class _RequestSink:
    """Hands deltas from the receiver thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_samples: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = num_samples  # receiver thread's count
        self.unfinished = num_samples  # event loop's count
        self.done = False

    def push(self, deltas: list[SampleDelta]) -> bool:
        self.remaining -= sum(d.finished for d in deltas)
        self._put(deltas)
        return self.remaining == 0

    def fail(self, error: BaseException) -> None:
        self._put(error)

    def count(self, deltas: list[SampleDelta]) -> None:
        self.unfinished -= sum(d.finished for d in deltas)
        self.done = self.unfinished == 0

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass


class _SampleBuilder:
    def __init__(self) -> None:
        self.deltas: list[SampleDelta] = []

    def add(self, delta: SampleDelta) -> None:
        self.deltas.append(delta)

    def build(self) -> SampleOutput:
        last = self.deltas[-1]
        joined = lambda name: [x for d in self.deltas for x in (getattr(d, name) or [])]
        return SampleOutput(joined("token_ids"), joined("logprobs"), last.finish_reason,
                            last.weight_version or 0, list(last.version_spans),
                            joined("raw_logprobs") if last.raw_logprobs is not None else None,
                            joined("top_logprobs") if last.top_logprobs is not None else None,
                            last.num_cached_tokens)


__all__ = ["AsyncRolloutEngine", "EngineDeadError"]
