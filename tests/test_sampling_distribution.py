"""Sampled-token frequencies follow the processed distribution (chi-square)."""
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from atom_rollout import RolloutEngine, SamplingParams
from conftest import hf_logits

PROMPT = [1, 2, 3, 4]
DRAWS = 4000


def _expected_probs(model, params: SamplingParams) -> torch.Tensor:
    logits = hf_logits(model, PROMPT)[-1:]
    for warper, on in ((TemperatureLogitsWarper(params.temperature), True),
                       (TopKLogitsWarper(max(params.top_k, 1)), params.top_k > 0),
                       (TopPLogitsWarper(params.top_p), params.top_p < 1),
                       (MinPLogitsWarper(params.min_p), params.min_p > 0)):
        if on:
            logits = warper(None, logits)
    return torch.softmax(logits, dim=-1)[0].double()


@pytest.mark.parametrize("params", [
    SamplingParams(n=DRAWS, temperature=1.0, max_tokens=1),
    SamplingParams(n=DRAWS, temperature=0.7, top_p=0.9, max_tokens=1),
    SamplingParams(n=DRAWS, temperature=1.5, top_k=5, min_p=0.05, max_tokens=1),
], ids=["t1", "t0.7-top-p", "t1.5-top-k-min-p"])
def test_frequencies_match_processed_distribution(tiny_vocab_checkpoint, params):
    model_dir, model = tiny_vocab_checkpoint
    engine = RolloutEngine(model_dir, show_progress=False, seed=2024, max_num_seqs=512,
                           enable_prefix_caching=False)
    probs = _expected_probs(model, params)
    out = engine.generate_batch([PROMPT], params)[0]
    tokens = torch.tensor([s.token_ids[0] for s in out.samples])
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token outside the processed support"
    support = probs > 0
    assert support.sum() >= 3, "test needs a non-degenerate distribution"
    expected = probs[support] / probs[support].sum() * counts.sum()
    result = chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, (counts, probs * DRAWS)
    logprobs = torch.tensor([s.logprobs[0] for s in out.samples]).double()
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-4)
