"""Sizing and allocating the paged KV cache."""
from __future__ import annotations

import torch

from ..models import DecoderSpec
from .config import EngineConfig


def block_bytes(spec: DecoderSpec, block_size: int, dtype: torch.dtype,
                num_layers: int | None = None) -> int:
    per_token = 2 * (num_layers or spec.num_layers) * spec.num_kv_heads * spec.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def num_kv_blocks(config: EngineConfig, spec: DecoderSpec, max_model_len: int,
                  device: torch.device, dtype: torch.dtype, num_layers: int) -> int:
    lookahead = 2 * config.num_speculative_tokens
    blocks_per_seq = -(-(max_model_len + lookahead) // config.block_size)
    if config.num_kv_blocks is not None:
        count, field = config.num_kv_blocks, "num_kv_blocks"
    else:
        budget, field = _memory_budget(config, spec, device, dtype), "gpu_memory_utilization"
        count = min(budget // block_bytes(spec, config.block_size, dtype, num_layers),
                    config.max_num_seqs * blocks_per_seq)
        if device.type == "cpu":
            field = "kv_cache_memory_gb"
    if count < blocks_per_seq:
        raise ValueError(f"{field}: the KV cache holds {count} blocks but one sequence of "
                         f"max_model_len={max_model_len} needs {blocks_per_seq}")
    return count


def _memory_budget(config: EngineConfig, spec: DecoderSpec, device: torch.device,
                   dtype: torch.dtype) -> int:
    if device.type != "cuda":
        return int(config.kv_cache_memory_gb * 2**30)
    free, total = torch.cuda.mem_get_info(device)
    return int(free - total * (1 - config.gpu_memory_utilization)
               - _activation_reserve(config, spec, dtype))


def _activation_reserve(config: EngineConfig, spec: DecoderSpec, dtype: torch.dtype) -> int:
    """A generous bound on one step's activations: hidden-sized and MLP-sized
    buffers for the token budget, plus fp32 logits work for the sampler/scorer."""
    item = torch.empty((), dtype=dtype).element_size()
    width = 6 * spec.hidden_size + 3 * spec.intermediate_size + 2 * spec.num_heads * spec.head_dim
    logits_rows = max(config.max_num_seqs, config.score_chunk_tokens)
    return config.max_num_batched_tokens * width * item + logits_rows * spec.vocab_size * 4 * 8


def allocate_kv_cache(spec: DecoderSpec, num_blocks: int, block_size: int,
                      device: torch.device, dtype: torch.dtype, num_layers: int):
    """One zeroed tensor [2, layers, blocks, block_size, kv_heads, head_dim] and
    its per-layer (k, v) views. Zeroed: masked-out slots must hold finite values."""
    cache = torch.zeros(2, num_layers, num_blocks, block_size, spec.num_kv_heads,
                        spec.head_dim, device=device, dtype=dtype)
    return cache, [(cache[0, i], cache[1, i]) for i in range(num_layers)]
