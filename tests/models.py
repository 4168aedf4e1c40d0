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


def add_mtp_head(path, hf_model, prompts: list[list[int]], steps: int = 80,
                 max_tokens: int = 40, seed: int = 0) -> str:
    """Self-distil an MTP layer on hf_model's greedy continuations of ``prompts`` (so its
    drafts are mostly accepted there) and save it into the checkpoint at ``path``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from atom_rollout.rl.mtp_head import MTPHead
    sequences = [_greedy(hf_model, prompt, max_tokens) for prompt in prompts]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[True] * len(s) + [False] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        hidden = hf_model.model(ids).last_hidden_state
    torch.manual_seed(seed)
    head = MTPHead(hf_model)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = head.loss(ids, hidden, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = Path(path)
    save_file({n: t.contiguous() for n, t in head.named_tensors()}, str(path / "mtp.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens
