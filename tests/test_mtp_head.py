"""The trainer-side MTP head is the engine's MTP layer, and trains without touching the policy."""

import pytest
import torch

from atom_rollout import RolloutEngine
from atom_rollout.kernels import AttentionMetadata, TorchOps
from atom_rollout.rl.mtp_head import MTPHead
from test_mtp import _with_mtp, mtp_tensors


def test_head_and_engine_layer_compute_the_same(tmp_path, checkpoints):
    _, policy = checkpoints["llama"]
    policy.save_pretrained(tmp_path)
    engine = RolloutEngine(_with_mtp(tmp_path, mtp_tensors(seed=0)), show_progress=False)
    head = MTPHead(policy)
    assert engine.update_weights(head.named_tensors()) == 1  # names map onto the engine
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (1, 9), generator=gen)
    with torch.no_grad():
        hidden = policy.model(ids).last_hidden_state
        expected = head(ids, hidden)[0]
    length = ids.shape[1] - 1
    kv = torch.zeros(2, 16, policy.config.num_key_value_heads, 16)
    meta = AttentionMetadata(torch.arange(length), torch.tensor([0, length], dtype=torch.int32),
                             torch.tensor([length], dtype=torch.int32),
                             torch.tensor([[0]], dtype=torch.int32), length, length)
    model = engine.core.model
    got = model.mtp.layers[0](TorchOps(), hidden[0, :-1], model.model.embed_tokens(ids[0, 1:]),
                              torch.arange(length), model.cos_sin, (kv, kv.clone()), meta)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chain_is_the_engines_draft_chain(tmp_path, checkpoints):
    """head.chain's rows of origin i equal the engine's drafting after catch-up rows 0..i:
    the same inputs, rotary positions and attention context."""
    _, policy = checkpoints["qwen3"]
    policy.save_pretrained(tmp_path)
    engine = RolloutEngine(_with_mtp_like(tmp_path, policy), show_progress=False)
    head = MTPHead(policy)
    engine.update_weights(head.named_tensors())
    ids = torch.randint(3, 97, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = policy.model(ids).last_hidden_state
        expected = head.chain(ids, hidden, 3)
    model, origin = engine.core.model, 5
    layer, embed = model.mtp.layers[0], model.model.embed_tokens
    kv = torch.zeros(2, 16, policy.config.num_key_value_heads, policy.config.head_dim)
    kv = (kv, kv.clone())

    def mtp(previous, next_ids, first):
        n = len(next_ids)
        meta = AttentionMetadata(torch.arange(first, first + n),
                                 torch.tensor([0, n], dtype=torch.int32),
                                 torch.tensor([first + n], dtype=torch.int32),
                                 torch.tensor([[0]], dtype=torch.int32), n, first + n)
        return layer(TorchOps(), previous, embed(next_ids), torch.arange(first, first + n),
                     model.cos_sin, kv, meta)
    with torch.no_grad():
        rows = mtp(hidden[0, :origin + 1], ids[0, 1:origin + 2], 0)  # catch-up 0..origin
        torch.testing.assert_close(rows[origin], expected[0][0, origin], atol=1e-5, rtol=1e-5)
        previous = rows[origin:]
        for d in (2, 3):  # draft d: the position after the last, the previous output
            previous = mtp(previous, ids[0, origin + d:origin + d + 1], origin + d - 1)
            torch.testing.assert_close(previous[0], expected[d - 1][0, origin],
                                       atol=1e-5, rtol=1e-5)


def _with_mtp_like(path, policy) -> str:
    return _with_mtp(path, {n: t.clone() for n, t in MTPHead(policy).named_tensors()})


def test_mtp_loss_trains_the_head_only(checkpoints):
    _, policy = checkpoints["llama"]
    head = MTPHead(policy)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    pattern = torch.randint(3, 97, (8,), generator=gen)
    ids = pattern.repeat(4, 3)  # periodic: the next-next token is learnable
    policy.zero_grad(set_to_none=True)
    losses = []
    for _ in range(30):
        hidden = policy.model(ids).last_hidden_state
        loss = head.loss(ids, hidden)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in policy.parameters())


def test_tv_loss_is_one_minus_the_acceptance_probability(checkpoints):
    """divergence="tv": per row 1 - sum(min(p, q)), the chance speculative sampling
    rejects the draft; a step on it raises the head's acceptance of these rows."""
    _, policy = checkpoints["llama"]
    torch.manual_seed(3)
    head = MTPHead(policy)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = policy.model(ids).last_hidden_state
        logits = policy.get_output_embeddings()(hidden)

    def rejection() -> torch.Tensor:
        with torch.no_grad():
            q = policy.get_output_embeddings()(head(ids, hidden)[:, :-1]).softmax(-1)
            p = logits[:, 1:-1].softmax(-1)  # row i predicts token i + 2, the policy at i + 1
            return 1 - torch.minimum(p, q).sum(-1).mean()

    loss = head.loss(ids, hidden, teacher_logits=logits, divergence="tv")
    torch.testing.assert_close(loss, rejection(), atol=1e-5, rtol=1e-5)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    before = rejection()
    for _ in range(5):
        optimizer.zero_grad()
        head.loss(ids, hidden, teacher_logits=logits, divergence="tv").backward()
        optimizer.step()
    assert rejection() < before
    with pytest.raises(ValueError, match="divergence"):
        head.loss(ids, hidden, teacher_logits=logits, divergence="js")


def test_load_named_tensors_is_the_inverse_of_named_tensors(checkpoints):
    _, policy = checkpoints["llama"]
    torch.manual_seed(5)
    saved = {n: t.clone() for n, t in MTPHead(policy).named_tensors()}
    torch.manual_seed(6)
    head = MTPHead(policy)
    head.load_named_tensors(saved)
    for name, t in head.named_tensors():
        torch.testing.assert_close(t, saved[name], rtol=0, atol=0)
    before = {n: t.clone() for n, t in head.named_tensors()}
    some = dict(list(saved.items())[:-1])
    with pytest.raises(ValueError, match="names"):
        head.load_named_tensors(some)
    bad = {n: (t[:1] if i == 0 else -t) for i, (n, t) in enumerate(saved.items())}
    with pytest.raises(ValueError, match="shapes"):
        head.load_named_tensors(bad)
    for name, t in head.named_tensors():  # a refused load changed nothing
        torch.testing.assert_close(t, before[name], rtol=0, atol=0)
