"""Request bodies of the OpenAI-compatible API (with vLLM's extensions) and their
translation into SamplingParams. Unknown fields are ignored, as vLLM does; fields whose
non-default values we do not implement are rejected with 400 naming the field."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt

from ..sampler import SamplingParams

# field -> its neutral value; anything else is rejected (not implemented).
UNSUPPORTED = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
               "echo": False, "prompt_logprobs": None, "logit_bias": None, "suffix": None}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False  # accepted; token ids are always returned
    return_tokens_as_token_ids: bool = False
    return_raw_logprobs: bool = False
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    echo: bool | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != neutral and value != {}:
                raise ValueError(f"{name}: only {neutral!r} is supported, got {value!r}")
        if self.stop:
            raise ValueError("stop: stop strings are not supported; use stop_token_ids")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: must equal n ({self.n}), got {self.best_of}")

    def sampling_params(self, max_tokens: int, top_logprobs: int | None) -> SamplingParams:
        self.check_supported()
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "min_p": self.min_p}
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, seed=self.seed,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=top_logprobs or None, return_raw_logprobs=self.return_raw_logprobs,
            **{k: v for k, v in given.items() if v is not None})

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16
    logprobs: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: empty")
        return list(prompt)


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class WeightsFromDiskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    version: int | None = None
    inflight: Literal["recompute", "keep", "abort"] = "recompute"


class InitWeightSyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    backend: str = "nccl"


class ReceiveWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_s: float | None = None


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["abort", "wait", "keep"] = "abort"
