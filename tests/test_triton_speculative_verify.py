"""Speculative verification on the Triton passes (kernels/triton/speculative_verify.py)
against the torch reference (sampler.speculative.verify): same accepted runs, emitted
tokens and logprobs. Without a GPU the kernels run under the Triton interpreter."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from atom_rollout.sampler.speculative import verify  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")


def _case(rows: int, k: int, vocab: int, seed: int):
    """Target and draft processed log-probs that agree in part, drafts drawn from the
    draft, some tokens filtered out (-inf) as top-p would."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k + 1, vocab, generator=gen) * 2
    target = torch.log_softmax(logits, dim=-1)
    noise = torch.randn(rows, k, vocab, generator=gen) * torch.rand(rows, 1, 1, generator=gen)
    draft = torch.log_softmax(logits[:, :k] + noise, dim=-1)
    draft[0, :, vocab // 2:] = float("-inf")  # a filtered draft row
    draft[0] = torch.log_softmax(draft[0], dim=-1)
    target[1, :, : vocab // 3] = float("-inf")  # a filtered target row
    target[1] = torch.log_softmax(target[1], dim=-1)
    drafts = torch.multinomial(draft.exp().view(-1, vocab), 1, generator=gen).view(rows, k)
    drafts[2] = target[2, :k].argmax(-1)  # likely accepted
    accept_u = torch.rand(rows, k, generator=gen, dtype=torch.float64)
    final_u = torch.rand(rows, generator=gen, dtype=torch.float64)
    final_u[3] = 1 - 2.0 ** -53  # lands on the CDF's last step
    to = dict(device=DEVICE)
    return (target.to(**to), draft.to(**to), drafts.to(**to), accept_u.to(**to),
            final_u.to(**to))


def _check_same(fused_out, torch_out):
    assert fused_out.num_accepted.tolist() == torch_out.num_accepted.tolist()
    assert fused_out.num_emitted.tolist() == torch_out.num_emitted.tolist()
    assert fused_out.token_ids.tolist() == torch_out.token_ids.tolist()
    torch.testing.assert_close(fused_out.logprobs, torch_out.logprobs, atol=0, rtol=0)


@pytest.mark.parametrize("k,vocab,seed", [(1, 700, 0), (3, 3000, 1), (4, 1500, 2)])
def test_fused_verify_equals_torch(k, vocab, seed):
    rows = 8
    target, draft, drafts, accept_u, final_u = _case(rows, k, vocab, seed)
    greedy = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    args = (target, draft, drafts, accept_u, final_u, greedy)
    expected = verify(*args)
    _check_same(verify(*args, any_greedy=False, fused=True), expected)
    from atom_rollout.kernels.triton.speculative_verify import fused_verify
    tokens, logprobs, accepted = fused_verify(*args, None, block=256)  # several chunks
    assert tokens.tolist() == expected.token_ids.tolist()
    assert accepted.tolist() == expected.num_accepted.tolist()
    torch.testing.assert_close(logprobs, expected.logprobs, atol=0, rtol=0)
    counts = expected.num_accepted.tolist()
    assert min(counts) < k and max(counts) > 0  # rejections (residual draws) and accepts


def test_fused_verify_greedy_rows_and_the_bonus_token():
    """Greedy rows accept target argmaxes; a draft equal to the target is accepted in
    full and the bonus token is drawn from p."""
    rows, k, vocab = 6, 3, 2000
    target, _, drafts, accept_u, final_u = _case(rows, k, vocab, 5)
    draft = target[:, :k].clone()  # q == p: every draft is accepted
    greedy = torch.tensor([True, False, True, False, False, True], device=DEVICE)
    drafts[0] = target[0, :k].argmax(-1)
    drafts[0, 2] = (drafts[0, 2] + 1) % vocab  # greedy row 0 rejects its third draft
    args = (target, draft, drafts, accept_u, final_u, greedy)
    expected = verify(*args)
    _check_same(verify(*args, fused=True), expected)
    assert expected.num_accepted[0].item() == 2
    assert expected.num_accepted[[1, 3, 4]].tolist() == [k] * 3


def test_fused_verify_empty_residual_falls_back_to_p():
    """q > p everywhere (unnormalised, as only rounding could make it): a rejection
    leaves no residual mass, and both paths draw from p instead."""
    rows, k, vocab = 4, 2, 1200
    target, _, drafts, _, final_u = _case(rows, k, vocab, 7)
    draft = target[:, :k] + 0.1
    accept_u = torch.full((rows, k), 0.99, dtype=torch.float64, device=DEVICE)
    greedy = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    args = (target, draft, drafts, accept_u, final_u, greedy)
    expected = verify(*args)
    assert expected.num_accepted.tolist() == [0] * rows
    _check_same(verify(*args, any_greedy=False, fused=True), expected)
