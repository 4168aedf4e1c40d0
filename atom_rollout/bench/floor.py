"""The memory-bandwidth floor of a decode step, from bandwidth measured in the run."""
from __future__ import annotations

import torch


def copy_bandwidth(device: torch.device, num_bytes: int = 2**30, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting read plus write."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * num_bytes / sorted(times)[len(times) // 2]


def decode_floor_ms(model, context_len: int, bandwidth: float, batch: int = 1) -> float:
    """Every weight read once (the embedding table only as the LM head) plus every
    sequence's KV read once, over bandwidth."""
    spec = model.spec
    embedding = model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                       if p is not embedding or spec.tie_word_embeddings)
    item = next(model.parameters()).element_size()
    kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * item * context_len
    return (weight_bytes + batch * kv_bytes) / bandwidth * 1e3
