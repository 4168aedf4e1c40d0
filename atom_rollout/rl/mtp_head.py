"""Online MTP training for RL: a trainer-side copy of the engine's MTP draft layer.

``MTPHead(policy)`` builds the same layer the engine runs (models/mtp.py) from the
policy's own transformers classes, with the engine's tensor names, so it travels with
the policy's weights::

    head = MTPHead(policy)                       # optimise head.parameters() separately
    loss = head.loss(input_ids, hidden, mask)    # hidden: policy.model(...).last_hidden_state
    engine.update_weights(list(policy.named_parameters()) + head.named_tensors())

The loss reads the policy's hidden states, embeddings and LM head detached: it trains the
draft only and leaves the policy's gradient untouched.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class _SharedHead(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class _MTPLayer(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        config = copy.deepcopy(policy.config)
        config._attn_implementation = "sdpa"  # causal without an explicit mask
        hidden = config.hidden_size
        norm_class, layer_class = type(policy.model.norm), type(policy.model.layers[0])
        block = layer_class(config, layer_idx=0)
        # The block's parts sit at this level, so names match a main decoder layer's.
        self.self_attn, self.mlp = block.self_attn, block.mlp
        self.input_layernorm = block.input_layernorm
        self.post_attention_layernorm = block.post_attention_layernorm
        self._block = [block]  # a list: not registered twice
        self.enorm = norm_class(hidden, eps=config.rms_norm_eps)
        self.hnorm = norm_class(hidden, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.shared_head = _SharedHead(norm_class(hidden, eps=config.rms_norm_eps))

    def forward(self, previous_hidden, token_embeds, position_embeddings):
        x = torch.cat([self.enorm(token_embeds), self.hnorm(previous_hidden)], dim=-1)
        x = self._block[0](self.eh_proj(x), position_embeddings=position_embeddings)
        return self.shared_head.norm(x)


class MTPHead(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([_MTPLayer(policy)])
        first = next(policy.parameters())
        self.to(device=first.device, dtype=first.dtype)
        self._policy = [policy]  # shared embedding, rotary and LM head; not our parameters

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The engine's names (``mtp.layers.0.*``) for update_weights / WeightSender."""
        return [(f"mtp.{name}", p.detach()) for name, p in self.named_parameters()]

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """MTP hidden states [B, T-1, H]: row i pairs hidden[:, i] with the embedding of
        input_ids[:, i + 1] and predicts input_ids[:, i + 2]."""
        policy = self._policy[0]
        with torch.no_grad():
            embeds = policy.get_input_embeddings()(input_ids[:, 1:])
        previous = hidden[:, :-1].detach()
        positions = torch.arange(previous.shape[1], device=input_ids.device)[None]
        rotary = policy.model.rotary_emb(previous, positions)
        return self.layers[0](previous, embeds, rotary)

    def loss(self, input_ids: torch.Tensor, hidden: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the draft's next-next-token prediction; ``mask`` [B, T] marks
        the tokens that count as targets (default: all)."""
        out = self(input_ids, hidden)[:, :-1]
        head = self._policy[0].get_output_embeddings().weight.detach()
        logits = F.linear(out, head).float()
        targets = input_ids[:, 2:]
        weights = (torch.ones_like(targets, dtype=torch.bool) if mask is None
                   else mask[:, 2:]).float()
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (losses * weights.flatten()).sum() / weights.sum().clamp(min=1)
