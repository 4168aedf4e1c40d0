"""Prefix caching, preemption, seeds, stopping and outputs of the engine."""
import torch

from atom_rollout import RolloutEngine, SamplingParams

GREEDY = SamplingParams(n=8, temperature=0, max_tokens=20, ignore_eos=True)


def _tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


def test_prefix_cache_gives_same_results_and_hits(llama):
    prompts = [list(range(3, 40)), list(range(3, 40)), list(range(3, 30)) + [50, 51]]
    cached = RolloutEngine(llama[0], show_progress=False)
    uncached = RolloutEngine(llama[0], show_progress=False, enable_prefix_caching=False)
    with_cache = cached.generate_batch(prompts, GREEDY)
    assert _tokens(with_cache) == _tokens(uncached.generate_batch(prompts, GREEDY))
    assert cached.stats()["prefix_cache_hit_tokens"] > 0
    assert uncached.stats()["prefix_cache_hit_tokens"] == 0
    assert sum(s.num_cached_tokens for o in with_cache for s in o.samples) > 0
    # A second round hits the blocks the first one left behind.
    hits_before = cached.stats()["prefix_cache_hit_tokens"]
    assert _tokens(cached.generate_batch(prompts, GREEDY)) == _tokens(with_cache)
    assert cached.stats()["prefix_cache_hit_tokens"] > hits_before


def test_preemption_gives_same_results_and_completes_everything(llama):
    prompts = [list(range(3 + i, 30 + i)) for i in range(6)]
    params = SamplingParams(n=2, temperature=0.8, max_tokens=40, ignore_eos=True, seed=7)
    roomy = RolloutEngine(llama[0], show_progress=False)
    tight = RolloutEngine(llama[0], show_progress=False, num_kv_blocks=12, max_model_len=96,
                          max_num_batched_tokens=64)
    expected, got = roomy.generate_batch(prompts, params), tight.generate_batch(prompts, params)
    assert tight.stats()["num_preemptions"] > 0
    assert _tokens(got) == _tokens(expected)
    for a, b in zip(got, expected):
        for sa, sb in zip(a.samples, b.samples):
            assert torch.allclose(torch.tensor(sa.logprobs), torch.tensor(sb.logprobs), atol=1e-5)
            assert sa.finish_reason == "length" and len(sa.token_ids) == 40
    assert tight.stats()["free_kv_blocks"] == 12


def test_seeded_request_is_reproducible_in_any_batch(llama_engine):
    seeded = SamplingParams(n=3, temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    other = SamplingParams(n=5, temperature=0.9, top_p=0.9, max_tokens=25, ignore_eos=True)
    alone = llama_engine.generate_batch([[5, 6, 7]], seeded)[0]
    mixed = llama_engine.generate_batch([[9, 9, 9, 9], [5, 6, 7], [11] * 30],
                                        [other, seeded, other])[1]
    assert [s.token_ids for s in alone.samples] == [s.token_ids for s in mixed.samples]
    for a, b in zip(alone.samples, mixed.samples):  # equal up to batch-shape float noise
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert len({tuple(s.token_ids) for s in alone.samples}) == 3  # samples differ


def test_unseeded_samples_of_identical_prompts_differ(llama_engine):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = llama_engine.generate_batch([[5, 6, 7], [5, 6, 7]], params)
    samples = [tuple(s.token_ids) for o in outs for s in o.samples]
    assert len(set(samples)) == len(samples)


def test_stop_tokens_and_min_tokens(llama_engine):
    free = llama_engine.generate_batch([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True))[0].samples[0].token_ids
    stop = free[5]
    first_stop = free.index(stop)
    out = llama_engine.generate_batch([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop]))[0].samples[0]
    assert out.token_ids == free[:first_stop + 1] and out.finish_reason == "stop"
    params = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=3,
                            stop_token_ids=[stop], min_tokens=12)
    sample = llama_engine.generate_batch([[5, 6, 7]], params)[0].samples[0]
    assert stop not in sample.token_ids[:12]


def test_eos_stops_unless_ignored(tmp_path):
    from models import build_checkpoint
    build_checkpoint(tmp_path / "a", "llama", seed=11)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    free = RolloutEngine(str(tmp_path / "a"), show_progress=False).generate_batch(
        [[5, 6, 7]], greedy)[0].samples[0].token_ids
    eos = free[3]
    build_checkpoint(tmp_path / "b", "llama", seed=11, eos_token_id=[eos, 96])  # same weights
    engine = RolloutEngine(str(tmp_path / "b"), show_progress=False)
    stopped = engine.generate_batch([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=40))
    assert stopped[0].samples[0].token_ids == free[:free.index(eos) + 1]
    assert stopped[0].samples[0].finish_reason == "stop"
    assert engine.generate_batch([[5, 6, 7]], greedy)[0].samples[0].token_ids == free


def test_outputs_carry_version_and_order(llama_engine):
    prompts = [[3] * n for n in (5, 17, 2, 9)]
    outs = llama_engine.generate_batch(prompts, SamplingParams(n=2, max_tokens=4, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == prompts
    for o in outs:
        assert len(o.samples) == 2
        for s in o.samples:
            assert s.weight_version == 0 and s.version_spans == [(0, 0, 4)]
            assert s.raw_logprobs is None and s.top_logprobs is None


def test_per_prompt_params(llama_engine):
    a = SamplingParams(n=1, temperature=0, max_tokens=3, ignore_eos=True)
    b = SamplingParams(n=3, temperature=1, max_tokens=5, ignore_eos=True)
    outs = llama_engine.generate_batch([[4, 5], [6, 7]], [a, b])
    assert [len(o.samples) for o in outs] == [1, 3]
    assert [len(s.token_ids) for s in outs[1].samples] == [5, 5, 5]


def test_string_prompts_use_the_model_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from models import build_checkpoint
    build_checkpoint(tmp_path, "llama")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>"] + list("abcdefghij "))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(tmp_path)
    engine = RolloutEngine(str(tmp_path), show_progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    by_text = engine.generate_batch(["abc"], greedy)[0]
    by_ids = engine.generate_batch([engine.tokenizer.encode("abc")], greedy)[0]
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids
    assert by_text.samples[0].token_ids == by_ids.samples[0].token_ids


def test_sharded_checkpoint_loads(tmp_path, llama):
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(llama[0]).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sharded = RolloutEngine(str(tmp_path), show_progress=False).generate_batch([[4, 5, 6]], greedy)
    single = RolloutEngine(llama[0], show_progress=False).generate_batch([[4, 5, 6]], greedy)
    assert sharded[0].samples[0].token_ids == single[0].samples[0].token_ids
