"""One decoder serving the Llama, Qwen2, Qwen3 and Mistral families.

Parameter names follow transformers' except the fused ones: ``qkv_proj``
(q, k, v stacked by rows) and ``gate_up_proj`` (gate, up). ``ShardedParam``
records where each HF tensor lands, for loading and in-place updates alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import AttentionMetadata, KernelOps
from .rotary import cos_sin_table


@dataclass(frozen=True)
class DecoderSpec:
    """The shape facts of a checkpoint, read once from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config, qkv_bias: bool, qk_norm: bool) -> "DecoderSpec":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size,
                   config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   config.rms_norm_eps, qkv_bias, qk_norm,
                   bool(getattr(config, "tie_word_embeddings", False)))


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _param(size)
        self.eps = eps

    def forward(self, ops: KernelOps, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.qkv_proj.weight.shards = {"q_proj": (0, self.q_size),
                                       "k_proj": (self.q_size, self.kv_size),
                                       "v_proj": (self.q_size + self.kv_size, self.kv_size)}
        if spec.qkv_bias:
            self.qkv_proj.bias.shards = self.qkv_proj.weight.shards
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.scale = spec.head_dim ** -0.5

    def attend(self, ops: KernelOps, x: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata) -> torch.Tensor:
        """The heads' outputs [T, q_size], before o_proj (the layer fuses o_proj with
        the residual add and the next RMSNorm)."""
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q_weight, k_weight, eps = self._qk_norm_args()
        q, _ = ops.prepare_qkv(q, k, v, q_weight, k_weight, eps, positions, cos_sin,
                               kv_cache[0], kv_cache[1], meta.slot_mapping,
                               prefetch=self.o_proj.weight)
        out = ops.attention(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return out.reshape(-1, self.q_size)

    def _qk_norm_args(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * size, bias=False)
        self.gate_up_proj.weight.shards = {"gate_proj": (0, size), "up_proj": (size, size)}
        self.down_proj = nn.Linear(size, spec.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, ops: KernelOps, x: torch.Tensor, residual: torch.Tensor,
                positions: torch.Tensor, cos_sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x is this layer's input already normalised by input_layernorm (the layer
        before applied it); returns next_norm of the residual stream after this layer,
        and that stream. Each branch's last projection, its residual add and the
        RMSNorm after it are one op (``KernelOps.linear_add_rms_norm``)."""
        attn = self.self_attn
        heads = attn.attend(ops, x, positions, cos_sin, kv_cache, meta)
        post_norm = self.post_attention_layernorm
        x, residual = ops.linear_add_rms_norm(heads, attn.o_proj.weight, residual,
                                              post_norm.weight, post_norm.eps)
        gate_up = ops.linear(x, self.mlp.gate_up_proj.weight)
        return ops.linear_add_rms_norm(gate_up, self.mlp.down_proj.weight, residual,
                                       next_norm.weight, next_norm.eps, gated=True)


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Flat-token forward: input_ids [T] -> final hidden states [T, hidden]."""

    def __init__(self, spec: DecoderSpec, hf_config):
        super().__init__()
        self.spec, self.hf_config = spec, hf_config
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp: nn.Module | None = None  # MTP draft layers, see models/mtp.py
        for p in self.parameters():
            p.requires_grad_(False)
        self.cos_sin: torch.Tensor | None = None

    def init_rotary(self, max_positions: int, device: torch.device) -> None:
        self.cos_sin = cos_sin_table(self.hf_config, max_positions, device)

    def forward(self, ops: KernelOps, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        layers = self.model.layers
        residual = self.model.embed_tokens(input_ids)
        x = layers[0].input_layernorm(ops, residual)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for layer, kv_cache, next_norm in zip(layers, kv_caches, next_norms):
            x, residual = layer(ops, x, residual, positions, self.cos_sin, kv_cache, meta,
                                next_norm)
        return x

    def compute_logits(self, hidden: torch.Tensor, as_float32: bool = True,
                       ops: KernelOps | None = None) -> torch.Tensor:
        """LM-head logits, in float32 or (as_float32=False) in the model dtype: the
        samplers upcast exactly on load, so a step need not write a float32 copy.
        ``ops``: the projection is the backend's ``linear`` (at batch 1 the Triton
        one-row kernel, 438 -> 396 us for Qwen3-8B's head on an H100); None: nn.Linear."""
        head = self.lm_head
        logits = head(hidden) if ops is None else ops.linear(hidden, head.weight, head.bias)
        return logits.float() if as_float32 else logits
