"""Messages between a front end and the engine core process (pickled over pyzmq).

Front end -> core, input channel:  ("add", request_id, prompt_ids, params, stream)
                                    ("score", request_id, prompt_ids, response_ids, temperature)
                                    ("abort", [request_id, ...])
Front end -> core, control channel: (call_id, method, args, kwargs)
Core -> front end, output channel:  ("ready", CoreInfo) once, then
                                    ("deltas", [SampleDelta, ...]) after a step,
                                    ("reply", call_id, ok, value or exception),
                                    ("fatal", traceback text) before the core exits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


class EngineDeadError(RuntimeError):
    """The engine core process is gone; every pending and later call raises this."""


@dataclass(frozen=True)
class CoreAddresses:
    input: str
    control: str
    output: str

    @classmethod
    def in_dir(cls, directory: str) -> "CoreAddresses":
        """ipc:// endpoints inside a private directory chosen at run time."""
        return cls(*(f"ipc://{os.path.join(directory, name)}"
                     for name in ("input", "control", "output")))


@dataclass(frozen=True)
class CoreInfo:
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    weight_version: int
    pid: int


@dataclass
class SampleDelta:
    """New tokens of one sample since the last delta; the last one has finish_reason set.

    A non-streamed request gets a single delta per sample, at its end, holding everything.
    """

    request_id: str
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    raw_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    # set on the last delta only:
    weight_version: int | None = None
    version_spans: list[tuple[int, int, int]] = field(default_factory=list)
    num_cached_tokens: int = 0
    score: object = None  # score requests: a float32 tensor of the response logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
