"""Tiny random-weight checkpoints of every supported family, saved like HF does."""
from __future__ import annotations

import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, overrides); together they cover GQA, MQA, MHA, odd
# head_dim, tied and untied embeddings, qkv bias, q/k norm and llama3 rope.
VARIANTS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3_mqa": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                       rope_parameters=dict(
                                           rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                           low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=4, head_dim=16, sliding_window=None,
                                      tie_word_embeddings=False)),
}


def make_config(variant: str, **overrides):
    class_name, extra = VARIANTS[variant]
    config_class = getattr(transformers, class_name)
    return config_class(**{**BASE, **extra, **overrides})


def build_checkpoint(path, variant: str, seed: int = 0, **overrides):
    """Save a random-weight model (scaled up so logits are far from uniform)."""
    torch.manual_seed(seed)
    config = make_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "norm" not in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return model.eval()
