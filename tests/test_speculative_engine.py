"""MTP speculative decoding in the engine: exact at every temperature."""
import pytest
import torch
from scipy.stats import chisquare

from atom_rollout import RolloutEngine, SamplingParams
from conftest import hf_logits
from models import build_checkpoint
from test_mtp import _with_mtp, mtp_tensors

PROMPTS = [[5, 9, 14, 3], [7] * 21, list(range(10, 47))]


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp")
    model = build_checkpoint(path, "llama")
    return _with_mtp(path, mtp_tensors(seed=1)), model


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_speculation_equals_plain_greedy(mtp_checkpoint, k):
    model_dir, _ = mtp_checkpoint
    greedy = SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True)
    plain = RolloutEngine(model_dir, show_progress=False).generate_batch(PROMPTS, greedy)
    engine = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=k)
    spec = engine.generate_batch(PROMPTS, greedy)
    for a, b in zip(plain, spec):
        for sa, sb in zip(a.samples, b.samples):
            assert sb.token_ids == sa.token_ids and sb.finish_reason == "length"
            assert torch.allclose(torch.tensor(sb.logprobs), torch.tensor(sa.logprobs), atol=1e-4)
    stats = engine.stats()
    assert stats["drafts_proposed"] > 0
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=4),
    SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=20, ignore_eos=True, seed=5),
])
def test_sampled_logprobs_are_the_targets(mtp_checkpoint, params):
    from test_generate_vs_transformers import _hf_processed
    model_dir, model = mtp_checkpoint
    engine = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=3)
    for prompt, out in zip(PROMPTS, engine.generate_batch(PROMPTS, params)):
        for sample in out.samples:
            assert len(sample.token_ids) == 20
            logits = hf_logits(model, prompt + sample.token_ids)[len(prompt) - 1:-1]
            expected = _hf_processed(logits, params).gather(
                -1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_first_two_tokens_follow_the_target(tiny_vocab_checkpoint, tmp_path, temperature, top_p):
    """Joint of the first two emitted tokens vs the target's processed distribution."""
    from test_generate_vs_transformers import _hf_processed
    base_dir, model = tiny_vocab_checkpoint
    import shutil
    shutil.copytree(base_dir, tmp_path / "m")
    tensors = {n: t for n, t in _tiny_vocab_mtp(model).items()}
    engine = RolloutEngine(_with_mtp(tmp_path / "m", tensors), show_progress=False,
                           num_speculative_tokens=2, seed=7, max_num_seqs=512,
                           enable_prefix_caching=False)
    params = SamplingParams(n=4000, temperature=temperature, top_p=top_p, max_tokens=2,
                            ignore_eos=True)
    prompt = [1, 2, 3, 4]
    pairs = torch.tensor([s.token_ids for s in engine.generate_batch([prompt], params)[0].samples])
    first = _hf_processed(hf_logits(model, prompt)[-1:], params)[0].exp().double()
    second = torch.stack([_hf_processed(hf_logits(model, prompt + [t])[-1:], params)[0]
                          for t in range(8)]).exp().double()
    expected = (first[:, None] * second).flatten()
    counts = torch.bincount(pairs[:, 0] * 8 + pairs[:, 1], minlength=64).double()
    support = expected > 1e-12
    assert counts[~support].sum() == 0
    assert chisquare(counts[support].numpy(),
                     (expected[support] / expected[support].sum() * counts.sum()).numpy()
                     ).pvalue > 1e-3
    assert engine.stats()["drafts_proposed"] > 0


def _tiny_vocab_mtp(model) -> dict[str, torch.Tensor]:
    """Random MTP weights shaped for the tiny-vocabulary Qwen3 model."""
    from atom_rollout.models import WeightMap, build_model
    config = model.config
    config.num_nextn_predict_layers = 1
    config.architectures = ["Qwen3ForCausalLM"]
    ours = build_model(config)
    config.num_nextn_predict_layers = 0
    gen = torch.Generator().manual_seed(3)
    targets = WeightMap(ours).targets
    return {n: torch.randn(targets[n].shape, generator=gen) * 0.1 + (1.0 if "norm" in n else 0)
            for n in targets if n.startswith("mtp.")}


def _target_as_draft(engine, model):
    """Test hook: drafts drawn from the target itself (transformers), so every draft
    should be accepted; exercises multi-token acceptance end to end."""
    from atom_rollout.engine.speculation import Proposal
    from test_generate_vs_transformers import _hf_processed
    speculator = engine.core.runner.speculator
    gen = torch.Generator().manual_seed(0)

    def propose(hidden, catch_up, drafting, counters):
        proposals = []
        for seq, _, start, known in catch_up:
            if seq not in drafting:
                continue
            tokens, logps = seq.token_ids[:start + 1] + known, []
            for _ in range(speculator.k):
                logits = hf_logits(model, tokens)[-1:]
                logp = (torch.log_softmax(logits, -1) if seq.params.greedy
                        else _hf_processed(logits, seq.params))[0]
                if seq.params.greedy:
                    token = int(logp.argmax())
                else:
                    token = int(torch.multinomial(logp.exp(), 1, generator=gen))
                logps.append(logp)
                tokens.append(token)
            proposals.append(Proposal(seq, tokens[-speculator.k:], torch.stack(logps)))
        return proposals
    speculator.propose = propose


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_draft_equal_to_target_is_always_accepted(mtp_checkpoint, temperature):
    model_dir, model = mtp_checkpoint
    params = SamplingParams(n=2, temperature=temperature, max_tokens=24, ignore_eos=True,
                            seed=11)
    engine = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=3)
    _target_as_draft(engine, model)
    outs = engine.generate_batch(PROMPTS[:2], params)
    stats = engine.stats()
    assert stats["drafts_proposed"] > 0
    assert min(stats["draft_acceptance_by_position"]) > 0.98
    plain = RolloutEngine(model_dir, show_progress=False).generate_batch(PROMPTS[:2], params)
    for prompt, out, ref in zip(PROMPTS, outs, plain):
        for sample, ref_sample in zip(out.samples, ref.samples):
            assert len(sample.token_ids) == 24
            assert sample.num_drafts_accepted >= 0.98 * sample.num_drafts_proposed > 0
            if temperature == 0:
                assert sample.token_ids == ref_sample.token_ids
            logits = hf_logits(model, prompt + sample.token_ids)[len(prompt) - 1:-1]
            raw = torch.log_softmax(logits / (temperature or 1.0), -1)
            expected = raw.gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def test_speculation_survives_preemption_and_prefix_sharing(mtp_checkpoint):
    model_dir, _ = mtp_checkpoint
    prompts = [list(range(3 + i, 30 + i)) for i in range(4)] + [list(range(3, 30))] * 2
    greedy = SamplingParams(n=2, temperature=0, max_tokens=40, ignore_eos=True)
    plain = RolloutEngine(model_dir, show_progress=False).generate_batch(prompts, greedy)
    tight = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=2,
                          num_kv_blocks=14, max_model_len=96, max_num_batched_tokens=48)
    spec = tight.generate_batch(prompts, greedy)
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert [[s.token_ids for s in o.samples] for o in spec] == \
        [[s.token_ids for s in o.samples] for o in plain]
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"]


def test_seeded_speculative_samples_are_reproducible(mtp_checkpoint):
    model_dir, _ = mtp_checkpoint
    engine = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=2)
    seeded = SamplingParams(n=2, temperature=1.0, max_tokens=16, ignore_eos=True, seed=99)
    other = SamplingParams(n=3, temperature=0.8, max_tokens=12, ignore_eos=True)
    alone = engine.generate_batch([[5, 6, 7]], seeded)[0]
    mixed = engine.generate_batch([[9] * 5, [5, 6, 7]], [other, seeded])[1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in mixed.samples]


def test_speculation_needs_mtp_layers_and_rejects_logprob_extras(llama, mtp_checkpoint):
    with pytest.raises(ValueError, match="^num_speculative_tokens: the checkpoint has no MTP"):
        RolloutEngine(llama[0], num_speculative_tokens=2)
    with pytest.raises(ValueError, match="^num_speculative_tokens: must be"):
        RolloutEngine(mtp_checkpoint[0], num_speculative_tokens=5)
    engine = RolloutEngine(mtp_checkpoint[0], show_progress=False, num_speculative_tokens=1)
    with pytest.raises(ValueError, match="^logprobs: not available"):
        engine.generate_batch([[4, 5], [6, 7]], [SamplingParams(), SamplingParams(logprobs=2)])
    assert not engine.core.has_work()  # nothing was queued
    with pytest.raises(ValueError, match="^min_tokens: not available"):
        engine.generate_batch([[4, 5]], SamplingParams(min_tokens=2, max_tokens=4))
    assert engine.generate_batch([[4, 5]], SamplingParams(max_tokens=3))[0].samples[0].token_ids


def test_online_mtp_training_raises_acceptance_after_a_weight_update(mtp_checkpoint):
    """Self-distil the MTP head on the policy's own greedy rollouts (rl/mtp_head.py),
    push it with update_weights, and the engine's draft acceptance goes up."""
    from atom_rollout.rl.mtp_head import MTPHead
    model_dir, model = mtp_checkpoint
    prompts = [[5 + i, 9, 14 + i, 3] for i in range(8)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine = RolloutEngine(model_dir, show_progress=False, num_speculative_tokens=2)
    rollouts = engine.generate_batch(prompts, greedy)
    core = engine.core
    proposed, accepted = core.drafts_proposed, core.drafts_accepted_at[0]
    before = accepted / (proposed / 2)
    ids = torch.tensor([p + o.samples[0].token_ids for p, o in zip(prompts, rollouts)])
    torch.manual_seed(0)
    head = MTPHead(model)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    for _ in range(80):
        loss = head.loss(ids, hidden)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    engine.update_weights(head.named_tensors())
    second = engine.generate_batch(prompts, greedy)
    after = (core.drafts_accepted_at[0] - accepted) / ((core.drafts_proposed - proposed) / 2)
    assert after > before + 0.2, (before, after)  # first-draft acceptance, second run alone
    assert [o.samples[0].token_ids for o in second] == [o.samples[0].token_ids for o in rollouts]
