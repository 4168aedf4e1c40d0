"""Rotary tables computed by transformers' own rope code (all rope types)."""
from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


_LENGTH_DEPENDENT = ("dynamic", "longrope")


def cos_sin_table(hf_config, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin.

    transformers computes inv_freq and the attention scaling for every rope type
    (default, linear, dynamic, yarn, llama3, ...); reusing it keeps us exact.
    """
    rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT:
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} changes with sequence "
                         f"length and is not supported")
    with torch.device("cpu"):
        rope = LlamaRotaryEmbedding(hf_config)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, rope.inv_freq.float())
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rope.attention_scaling
    return table.to(device)
