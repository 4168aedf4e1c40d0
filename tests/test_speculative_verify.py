"""Speculative verification is exact: emitted tokens follow the target distribution."""
import pytest
import torch
from scipy.stats import chisquare

from atom_rollout.sampler import processed_logprobs
from atom_rollout.sampler.speculative import verify

VOCAB, TABLE_ROWS = 5, 97


class ToyModel:
    """Next-token logits as a fixed random function of the whole prefix."""

    def __init__(self, seed: int, sharpness: float):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(TABLE_ROWS, VOCAB, generator=gen, dtype=torch.float64) * sharpness

    def logits(self, prefixes: torch.Tensor) -> torch.Tensor:
        weights = 7 ** torch.arange(prefixes.shape[1], dtype=torch.int64)
        index = ((prefixes + 1) * weights).sum(dim=1) % TABLE_ROWS if prefixes.shape[1] else \
            torch.zeros(prefixes.shape[0], dtype=torch.int64)
        return self.table[index].float()


def _process(logits, temperature, top_p):
    rows = logits.shape[0]
    full = lambda v, dt=torch.float32: torch.full((rows,), v, dtype=dt)  # noqa: E731
    return processed_logprobs(logits, full(temperature), full(0, torch.int64), full(top_p),
                              full(0.0), top_p < 1, False)


def _draw(logp, gen):
    u = torch.rand(logp.shape[0], generator=gen, dtype=torch.float64)
    cdf = logp.double().exp().cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(
        max=VOCAB - 1)


def _speculate(target, draft, prefixes, k, temperature, top_p, gen, greedy=False):
    """One speculative round from each prefix; returns VerifyOutput."""
    rows = prefixes.shape[0]
    drafts, draft_logps, context = [], [], prefixes
    for _ in range(k):
        logp = _process(draft.logits(context), temperature, top_p)
        token = logp.argmax(-1) if greedy else _draw(logp, gen)
        drafts.append(token)
        draft_logps.append(logp)
        context = torch.cat([context, token[:, None]], dim=1)
    drafts = torch.stack(drafts, dim=1)
    target_logps = [_process(target.logits(torch.cat([prefixes, drafts[:, :i]], dim=1)),
                             temperature, top_p) for i in range(k + 1)]
    return verify(torch.stack(target_logps, 1), torch.stack(draft_logps, 1), drafts,
                  torch.rand(rows, k, generator=gen, dtype=torch.float64),
                  torch.rand(rows, generator=gen, dtype=torch.float64),
                  torch.full((rows,), greedy))


def _first_two_tokens(target, draft, k, temperature, top_p, trials, gen):
    """Run rounds until every trial emitted two tokens; return them [trials, 2]."""
    out = _speculate(target, draft, torch.zeros(trials, 0, dtype=torch.int64), k, temperature,
                     top_p, gen)
    first, second = out.token_ids[:, 0], out.token_ids[:, 1]
    need = out.num_emitted < 2
    if need.any():
        more = _speculate(target, draft, first[need][:, None], k, temperature, top_p, gen)
        second = second.clone()
        second[need] = more.token_ids[:, 0]
    return torch.stack([first, second], dim=1)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
@pytest.mark.parametrize("k", [1, 3])
def test_joint_of_first_two_tokens_matches_target(temperature, top_p, k):
    target, draft = ToyModel(0, 1.5), ToyModel(1, 1.5)
    gen = torch.Generator().manual_seed(123)
    trials = 30000
    pairs = _first_two_tokens(target, draft, k, temperature, top_p, trials, gen)
    counts = torch.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB).double()
    empty = torch.zeros(1, 0, dtype=torch.int64)
    p1 = _process(target.logits(empty), temperature, top_p)[0].double().exp()
    firsts = torch.arange(VOCAB)[:, None]
    p2 = _process(target.logits(firsts), temperature, top_p).double().exp()
    expected = (p1[:, None] * p2).flatten() * trials
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support].numpy(),
                     (expected[support] / expected[support].sum() * counts.sum()).numpy()
                     ).pvalue > 1e-3


def test_logprobs_are_the_targets_and_identical_draft_accepts_everything():
    target = ToyModel(0, 1.5)
    gen = torch.Generator().manual_seed(5)
    prefixes = torch.randint(0, VOCAB, (2000, 2), generator=gen)
    out = _speculate(target, target, prefixes, 3, 1.0, 1.0, gen)
    assert (out.num_accepted == 3).all() and (out.num_emitted == 4).all()
    context = prefixes
    for i in range(4):
        logp = _process(target.logits(context), 1.0, 1.0)
        expected = logp.gather(-1, out.token_ids[:, i:i + 1])[:, 0]
        assert torch.allclose(out.logprobs[:, i], expected, atol=1e-6)
        context = torch.cat([context, out.token_ids[:, i:i + 1]], dim=1)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_emits_the_target_argmax_chain(k):
    target, draft = ToyModel(0, 1.5), ToyModel(2, 1.5)
    gen = torch.Generator().manual_seed(9)
    prefixes = torch.randint(0, VOCAB, (500, 3), generator=gen)
    out = _speculate(target, draft, prefixes, k, 1.0, 1.0, gen, greedy=True)
    context = prefixes
    for i in range(k + 1):
        argmax = target.logits(context).argmax(-1)
        live = out.num_emitted > i
        assert (out.token_ids[live, i] == argmax[live]).all()
        assert (out.token_ids[~live, i] == -1).all()
        context = torch.cat([context, argmax[:, None]], dim=1)
    assert (out.num_accepted < k).any() and (out.num_accepted > 0).any()


@pytest.mark.parametrize("vocab, block", [(37, 8), (64, 16), (1000, 1024)])
def test_blocked_inverse_cdf_equals_the_full_scan(vocab, block):
    from atom_rollout.sampler.speculative import blocked_inverse_cdf
    gen = torch.Generator().manual_seed(vocab)
    weights = torch.rand(200, vocab, generator=gen) ** 4
    weights[weights < 0.05] = 0  # filtered tokens
    weights[0] = 0
    weights[0, vocab - 1] = 0.3  # all the mass on the last token
    uniforms = torch.rand(200, generator=gen, dtype=torch.float64)
    cdf = weights.double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    tokens = blocked_inverse_cdf(weights, uniforms, block=block)
    assert torch.equal(tokens, expected)
    assert (weights.gather(1, tokens[:, None]) > 0).all()
