"""DeepSeek-V3-style multi-token-prediction (MTP) layers for the dense families.

An MTP layer predicts the token after next: RMSNorm of the next token's embedding and
RMSNorm of the previous position's hidden state, concatenated and projected back to the
hidden size, one decoder block, a final RMSNorm, then the model's shared LM head.

Checkpoint layout (ours, for Llama/Qwen2/Qwen3/Mistral): config.json sets
``num_nextn_predict_layers: n`` and layer j holds ``mtp.layers.{j}.enorm.weight``,
``.hnorm.weight``, ``.eh_proj.weight`` [hidden, 2 * hidden], the family's decoder-block
tensors under the same names as a main layer (``self_attn.q_proj.weight``, ...,
``mlp.down_proj.weight``, ``input_layernorm.weight``, ``post_attention_layernorm.weight``)
and ``.shared_head.norm.weight``. DeepSeek-V3's layout is the same tree under
``model.layers.{num_hidden_layers + j}.``; its copies of the shared embedding and head
(``embed_tokens``, ``shared_head.head``) are ignored. Both layouts are ordinary named
tensors for loading, ``update_weights`` and the broadcast path.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import AttentionMetadata, KernelOps
from .decoder import DecoderLayer, DecoderSpec, RMSNorm


class SharedHead(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class MTPLayer(DecoderLayer):
    def __init__(self, spec: DecoderSpec):
        super().__init__(spec)
        self.enorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.hnorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * spec.hidden_size, spec.hidden_size, bias=False)
        self.shared_head = SharedHead(spec)

    def forward(self, ops: KernelOps, previous_hidden: torch.Tensor, token_embeds: torch.Tensor,
                positions: torch.Tensor, cos_sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] for the shared LM head; row t pairs the hidden state
        of position t - 1 with the embedding of the token at position t."""
        x = torch.cat([self.enorm(ops, token_embeds), self.hnorm(ops, previous_hidden)], -1)
        residual = self.eh_proj(x)
        x, _ = super().forward(ops, self.input_layernorm(ops, residual), residual, positions,
                               cos_sin, kv_cache, meta, self.shared_head.norm)
        return x


class MTPStack(nn.Module):
    def __init__(self, spec: DecoderSpec, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(MTPLayer(spec) for _ in range(num_layers))


def num_mtp_layers(hf_config) -> int:
    return int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
