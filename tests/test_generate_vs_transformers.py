"""Greedy generation, sampled-token logprobs and score() against transformers."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from atom_rollout import RolloutEngine, SamplingParams
from conftest import hf_greedy, hf_logits
from models import VARIANTS

PROMPTS = [[5, 9, 14, 3], [7] * 21, list(range(10, 47)), [33, 34]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers(checkpoints, variant):
    model_dir, model = checkpoints[variant]
    engine = RolloutEngine(model_dir, show_progress=False, max_num_batched_tokens=40)
    outs = engine.generate_batch(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                         ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 24)
        assert out.samples[0].finish_reason == "length"


def _hf_processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        logits = warper(None, logits)
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=1.0, max_tokens=12, ignore_eos=True),
    SamplingParams(n=3, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, max_tokens=12,
                   ignore_eos=True, return_raw_logprobs=True, logprobs=3),
    SamplingParams(n=2, temperature=1.3, top_p=0.8, max_tokens=12, ignore_eos=True,
                   return_raw_logprobs=True),
], ids=["plain", "all-filters", "hot-top-p"])
def test_sampled_logprobs_match_processed_distribution(checkpoints, variant, params):
    model_dir, model = checkpoints[variant]
    engine = RolloutEngine(model_dir, show_progress=False, seed=1)
    outs = engine.generate_batch(PROMPTS[:3], params)
    for prompt, out in zip(PROMPTS[:3], outs):
        for sample in out.samples:
            logits = hf_logits(model, prompt + sample.token_ids)[len(prompt) - 1:-1]
            target = torch.tensor(sample.token_ids)[:, None]
            processed = _hf_processed(logits, params)
            expected = processed.gather(-1, target)[:, 0]
            assert torch.isfinite(expected).all()
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
            if params.return_raw_logprobs:
                raw = torch.log_softmax(logits, -1).gather(-1, target)[:, 0]
                assert torch.allclose(torch.tensor(sample.raw_logprobs), raw, atol=1e-4)
            if params.logprobs:
                top = processed.topk(params.logprobs, dim=-1)
                for pos, alternatives in enumerate(sample.top_logprobs):
                    assert [t for t, _ in alternatives] == top.indices[pos].tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_score_matches_transformers(checkpoints, variant):
    model_dir, model = checkpoints[variant]
    engine = RolloutEngine(model_dir, show_progress=False, max_num_batched_tokens=48,
                           score_chunk_tokens=7)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (1, 5, 19, 40)]
    responses = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (30, 1, 13, 70)]
    for temperature in (1.0, 0.6):
        scores = engine.score(prompts, responses, temperature=temperature)
        for prompt, response, score in zip(prompts, responses, scores):
            logits = hf_logits(model, prompt + response)[len(prompt) - 1:-1] / temperature
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])
            assert score.shape == (len(response),) and score.dtype == torch.float32
            assert torch.allclose(score, expected[:, 0], atol=1e-4)


def test_generated_logprobs_equal_score(llama_engine):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=5)
    out = llama_engine.generate_batch([PROMPTS[0]], params)[0]
    scores = llama_engine.score([PROMPTS[0]] * 4, [s.token_ids for s in out.samples])
    for sample, score in zip(out.samples, scores):
        assert torch.allclose(torch.tensor(sample.logprobs), score, atol=1e-4)
