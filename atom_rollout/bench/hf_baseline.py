"""transformers' generate on the same workload: the in-process baseline."""
from __future__ import annotations

import time

import torch
import transformers

from .workloads import Workload


def time_hf_generate(model_dir: str, workload: Workload, device: torch.device,
                     dtype: torch.dtype, max_batch: int = 256, random_init: bool = False) -> dict:
    """Sampled generation of every prompt x n, same-length prompts, batched."""
    model = _load(model_dir, device, dtype, random_init)
    rows = [(prompt, p) for prompt, p in zip(workload.prompts, workload.params)
            for _ in range(p.n)]
    out_tokens, start = 0, time.perf_counter()
    for offset in range(0, len(rows), max_batch):
        chunk = rows[offset:offset + max_batch]
        max_tokens = chunk[0][1].max_tokens
        ids = torch.tensor([prompt for prompt, _ in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids))
        out_tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    del model
    seconds = time.perf_counter() - start
    return {"engine": "transformers.generate", "output_tokens": out_tokens,
            "seconds": seconds, "output_tok_per_s": out_tokens / seconds}


def _load(model_dir: str, device: torch.device, dtype: torch.dtype, random_init: bool):
    if random_init:  # same shape, its own random weights: only the speed matters here
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval()
