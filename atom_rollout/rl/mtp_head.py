"""Online MTP training for RL: a trainer-side copy of the engine's MTP draft layer.

``MTPHead(policy)`` builds the same layer the engine runs (models/mtp.py) from the
policy's own transformers classes, with the engine's tensor names, so it travels with
the policy's weights::

    head = MTPHead(policy)                       # optimise head.parameters() separately
    head.load_named_tensors(load_file("ckpt/mtp.safetensors"))  # optional: a trained start
    loss = head.loss(input_ids, hidden, mask)    # hidden: policy.model(...).last_hidden_state
    loss = head.loss(input_ids, hidden, mask, teacher_logits=logits, depth=3)  # distil, chained
    loss = head.loss(..., teacher_logits=logits, divergence="tv")  # 1 - acceptance itself
    engine.update_weights(list(policy.named_parameters()) + head.named_tensors())

The loss reads the policy's hidden states, embeddings and LM head detached: it trains the
draft only and leaves the policy's gradient untouched.
"""
from __future__ import annotations

import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class _SharedHead(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm


class _MTPLayer(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        config = copy.deepcopy(policy.config)
        config._attn_implementation = "sdpa"  # causal without a mask; chain() passes its own
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
        params = inspect.signature(block.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 4

    def forward(self, previous_hidden, token_embeds, position_embeddings, context=None,
                attention_mask=None):
        """``context`` (a _KeyValues) keeps this call's keys and values after earlier ones'
        for the attention, under ``attention_mask`` (default: causal)."""
        x = torch.cat([self.enorm(token_embeds), self.hnorm(previous_hidden)], dim=-1)
        x = self._block[0](self.eh_proj(x), position_embeddings=position_embeddings,
                           attention_mask=attention_mask, **{self._cache_arg: context})
        return self.shared_head.norm(x)


class _KeyValues:
    """The attention's keys and values of the chain's steps so far (a minimal KV cache)."""

    def __init__(self):
        self.keys = self.values = None

    def update(self, keys, values, *args, **kwargs):
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


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

    @torch.no_grad()
    def load_named_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of ``named_tensors``: a head saved in our layout (for example a
        checkpoint's mtp.safetensors) into this one; every tensor must be there, with its
        shape, or nothing changes."""
        params = dict(self.named_parameters())
        named = {name.removeprefix("mtp."): t for name, t in tensors.items()}
        if set(named) != set(params):
            raise ValueError(f"tensors: names {sorted(set(named) ^ set(params))} do not "
                             f"match the head's")
        wrong = [n for n, t in named.items() if t.shape != params[n].shape]
        if wrong:
            raise ValueError(f"tensors: shapes of {wrong} do not match the head's")
        for name, t in named.items():
            params[name].copy_(t)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """MTP hidden states [B, T-1, H]: row i pairs hidden[:, i] with the embedding of
        input_ids[:, i + 1] and predicts input_ids[:, i + 2]."""
        return self.chain(input_ids, hidden, 1)[0]

    def chain(self, input_ids: torch.Tensor, hidden: torch.Tensor,
              depth: int) -> list[torch.Tensor]:
        """The MTP rows of ``depth`` chained steps, as the engine drafts: step d's output
        [B, T-d, H] has row i at position i + d - 1, pairing step d-1's row i (the
        policy's hidden state for d = 1) with the embedding of input_ids[:, i + d]; it
        predicts input_ids[:, i + d + 1].

        This is the engine's draft chain started after every position i at once
        (MTPSpeculator.propose / _chain_step: draft j+1 is made at the position after the
        row that drafted j, from that row's output), with the engine's attention context:
        a chained row sees the step-1 ("catch-up") rows up to position i and the rows of
        its own chain, nothing else."""
        context = _KeyValues()
        previous = hidden[:, :-1].detach()
        outs = []
        for d in range(1, depth + 1):
            rows = previous.shape[1]
            positions = torch.arange(d - 1, d - 1 + rows, device=input_ids.device)[None]
            mask = None if d == 1 else _chain_mask(input_ids.shape[1], d, input_ids.device)
            outs.append(self._step(previous, input_ids[:, d:], positions, context, mask))
            previous = outs[-1][:, :-1]
        return outs

    def loss(self, input_ids: torch.Tensor, hidden: torch.Tensor,
             mask: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
             depth: int = 1, divergence: str = "kl") -> torch.Tensor:
        """Draft loss averaged over ``depth`` chained steps (see ``chain``); ``mask`` [B, T]
        marks the tokens that count as targets (default: all).

        Without ``teacher_logits``: cross-entropy of the actual tokens. With them (the
        policy's logits [B, T, V] for input_ids): KL(teacher || draft) at temperature 1,
        the teacher's row i + d being the target of step d's row i. Speculative sampling
        accepts with probability 1 - TV(teacher, draft), which matching whole
        distributions serves better than hard labels. ``divergence="tv"`` minimises
        TV(teacher, draft) itself (its gradient reaches only tokens the draft
        under-weights; a fine-tuning objective for a head KL has already shaped)."""
        if divergence not in _DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, "
                             f"got {divergence!r}")
        depth = max(1, min(depth, input_ids.shape[1] - 2))
        weights = (torch.ones_like(input_ids, dtype=torch.float32) if mask is None
                   else mask.float())
        head = self._policy[0].get_output_embeddings().weight.detach()
        losses = [self._depth_loss(out[:, :-1], d, input_ids, weights, head, teacher_logits,
                                   _DIVERGENCES[divergence])
                  for d, out in enumerate(self.chain(input_ids, hidden, depth), start=1)]
        return torch.stack(losses).mean()

    def _step(self, previous, next_ids, positions, context, mask) -> torch.Tensor:
        policy = self._policy[0]
        with torch.no_grad():
            embeds = policy.get_input_embeddings()(next_ids)
        rotary = policy.model.rotary_emb(previous, positions)
        return self.layers[0](previous, embeds, rotary, context, mask)

    def _depth_loss(self, out, d, input_ids, weights, head, teacher_logits,
                    divergence) -> torch.Tensor:
        """Mean loss of step d's rows (out [B, T-d-1, H]; row i predicts token i + d + 1)."""
        row_weights = weights[:, d + 1:]
        b, i = row_weights.nonzero(as_tuple=True)
        targets = input_ids if teacher_logits is None else teacher_logits.detach()
        shift = d + 1 if teacher_logits is None else d
        row_loss = functools.partial(_row_loss, divergence=divergence)
        rows = functools.partial(checkpoint, row_loss, use_reentrant=False) \
            if torch.is_grad_enabled() else row_loss
        total = out.new_zeros((), dtype=torch.float32)
        for start in range(0, len(b), _CHUNK_ROWS):
            cb, ci = b[start:start + _CHUNK_ROWS], i[start:start + _CHUNK_ROWS]
            losses = rows(out[cb, ci], head, targets, cb, ci + shift)
            total = total + (losses * row_weights[cb, ci]).sum()
        return total / row_weights.sum().clamp(min=1)


def _chain_mask(length: int, depth: int, device) -> torch.Tensor:
    """[1, 1, rows, keys] (True: attend) for step ``depth``'s rows over the keys of steps
    1..depth in order: row i sees step-1 rows j <= i and row i of each later step."""
    rows = torch.arange(length - depth, device=device)[:, None]
    parts = [torch.arange(length - 1, device=device)[None] <= rows]
    parts += [torch.arange(length - d, device=device)[None] == rows for d in range(2, depth + 1)]
    return torch.cat(parts, dim=1)[None, None]


# Rows of [rows, V] logits at a time, recomputed in backward: with V = 49k (SmolLM2) the
# [B, T, V] float32 logits of every step would otherwise all stay saved for backward.
_CHUNK_ROWS = 4096


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def _tv(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


_DIVERGENCES = {"kl": _kl, "tv": _tv}


def _row_loss(x: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
              b: torch.Tensor, t: torch.Tensor, divergence=_kl) -> torch.Tensor:
    """Per-row loss of draft hidden states x [n, H] against targets[b, t]: cross-entropy
    when targets holds token ids [B, T], ``divergence``(draft, teacher) when teacher
    logits [B, T, V].
    Indexing here, not in the caller, keeps a gathered [n, V] copy out of what backward
    saves."""
    log_q = F.log_softmax(F.linear(x, head).float(), dim=-1)
    if targets.dim() == 2:
        return F.nll_loss(log_q, targets[b, t], reduction="none")
    return divergence(log_q, F.log_softmax(targets[b, t].float(), dim=-1))
