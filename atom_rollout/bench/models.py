"""Model directories for benchmarks: built on the fly from HF configs."""
from __future__ import annotations

import os
import tempfile

import torch
import transformers

# Real shapes of public checkpoints (random weights) and the built-in tiny model.
SHAPES = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, tie_word_embeddings=False),
}


def shape_config(name: str) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**SHAPES[name], max_position_embeddings=40960,
                                    rope_parameters=dict(rope_type="default",
                                                         rope_theta=1000000.0),
                                    rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
                                    architectures=["Qwen3ForCausalLM"])


def config_dir(name: str, root: str | None = None) -> str:
    """A directory holding only config.json: for engines with load_format="dummy"."""
    path = os.path.join(root or tempfile.mkdtemp(prefix="atom-rollout-"), name + "-config")
    shape_config(name).save_pretrained(path)
    return path


def random_model_dir(name: str, seed: int = 0, root: str | None = None) -> str:
    """Save a random-weight model of the named shape; returns its directory."""
    path = os.path.join(root or tempfile.mkdtemp(prefix="atom-rollout-"), name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(shape_config(name),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path
