"""Sampler pieces: counter-based noise and processed logprobs."""
import torch
from scipy.stats import kstest

from atom_rollout.sampler import processed_logprobs
from atom_rollout.sampler.noise import row_uniforms, sample_key, signed64


def test_row_uniforms_are_uniform_and_independent():
    keys = torch.tensor([signed64(sample_key(7, j)) for j in range(64)], dtype=torch.int64)
    draws = torch.stack([row_uniforms(keys, torch.full((64,), i)) for i in range(200)])
    assert kstest(draws.flatten().numpy(), "uniform").pvalue > 1e-3
    assert ((draws > 0) & (draws < 1)).all()
    # rows and positions don't repeat each other
    assert torch.corrcoef(draws.T).fill_diagonal_(0).abs().max() < 0.35
    assert len(set(draws.flatten().tolist())) == draws.numel()


def test_noise_depends_only_on_key_and_counter():
    keys = torch.tensor([11, 12, 13])
    counters = torch.tensor([0, 5, 9])
    full = row_uniforms(keys, counters)
    assert row_uniforms(keys[1:2], counters[1:2]).item() == full[1].item()


def test_processed_logprobs_filters_in_order():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
    lp = processed_logprobs(logits, one(1.0), one(3, torch.int64), one(1.0), one(0.0), True, False)
    assert torch.isinf(lp[0, 3:]).all() and torch.isclose(lp.exp().sum(), torch.tensor(1.0))
    lp = processed_logprobs(logits, one(1.0), one(0, torch.int64), one(0.5), one(0.0), True, False)
    assert torch.isfinite(lp[0, 0]) and torch.isinf(lp[0, 1:]).all()
    lp = processed_logprobs(logits, one(1.0), one(0, torch.int64), one(1.0), one(0.3), False, True)
    assert torch.isfinite(lp[0, :2]).all() and torch.isinf(lp[0, 2:]).all()
