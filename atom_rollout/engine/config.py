"""EngineConfig: every engine option in one validated dataclass."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

DEVICE_ENV_VAR = "ATOM_ROLLOUT_DEVICE"  # what device="auto" means, when set

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    model_dir: str
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: $ATOM_ROLLOUT_DEVICE, else cuda when available
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    num_kv_blocks: int | None = None  # default: sized from memory
    kv_cache_memory_gb: float = 2.0  # CPU KV budget when num_kv_blocks is unset
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kernel_backend: str | None = None  # aiter | triton | torch; default picks the best
    seed: int | None = None  # seeds the noise keys of unseeded requests
    score_chunk_tokens: int = 1024  # logits rows materialised at once by score()
    enforce_eager: bool = False  # True: no CUDA graphs
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay graphs
    load_format: str = "auto"  # auto: the checkpoint's safetensors; dummy: random weights
    num_speculative_tokens: int = 0  # k MTP drafts per step (1-4); needs MTP layers
    # Launch step N+1 before reading back step N's tokens (placeholders fed on the
    # device, stop checks one step late). None: on for CUDA engines without speculation.
    async_scheduling: bool | None = None
    # Compile prefill and sampling kernel variants at start-up (engine/warmup.py).
    # None: on for CUDA engines.
    warmup: bool | None = None
    show_progress: bool = True

    @classmethod
    def from_options(cls, model_dir: str, **options) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown engine option; known: {sorted(known)}")
        config = cls(model_dir=model_dir, **options)
        config.validate()
        return config

    def validate(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "score_chunk_tokens",
                    "cuda_graph_max_batch")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")
        if self.num_speculative_tokens not in range(5):
            raise ValueError(f"num_speculative_tokens: must be 0 (off) to 4, "
                             f"got {self.num_speculative_tokens!r}")
        for name in ("async_scheduling", "warmup"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name}: must be True, False or None (auto), "
                                 f"got {getattr(self, name)!r}")
        if self.async_scheduling and self.num_speculative_tokens:
            raise ValueError("async_scheduling: not supported with num_speculative_tokens "
                             "(a speculative step needs its verified tokens on the host)")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: must be 'auto' or 'dummy', got {self.load_format!r}")
        self.torch_device()
        self.torch_dtype()

    def torch_device(self) -> torch.device:
        field, name = "device", self.device
        if name == "auto":
            field, name = DEVICE_ENV_VAR, os.environ.get(DEVICE_ENV_VAR) or (
                "cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"{field}: {e}") from None

    def torch_dtype(self) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[self.dtype]
