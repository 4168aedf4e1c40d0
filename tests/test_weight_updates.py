"""In-place weight updates: validation, versioning, cache invalidation, in-flight policies."""
import copy

import pytest
import torch

from atom_rollout import RolloutEngine, SamplingParams
from conftest import hf_greedy, hf_logits

PROMPTS = [list(range(3, 40)), [5, 6, 7, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def perturbed(model, seed=1, scale=0.05):
    """A copy of an HF model with every weight moved; returns (model, its named tensors)."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return new, list(new.named_parameters())


def _score_matches(engine, model, prompts, responses):
    for prompt, response, score in zip(prompts, responses, engine.score(prompts, responses)):
        logits = hf_logits(model, prompt + response)[len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        if not torch.allclose(score, expected, atol=1e-4):
            return False
    return True


@pytest.mark.parametrize("variant", ["llama", "qwen2"])  # untied and tied embeddings
def test_update_changes_outputs_and_bumps_version(checkpoints, variant):
    model_dir, model = checkpoints[variant]
    engine = RolloutEngine(model_dir, show_progress=False)
    responses = [[9, 10, 11, 12], [13, 14]]
    before = engine.score(PROMPTS, responses)
    engine.generate_batch(PROMPTS, GREEDY)  # fill the prefix cache under the old weights
    new_model, named = perturbed(model)
    prefixed = [(f"_orig_mod.module.{n}", t) for n, t in named]  # wrappers are stripped
    assert engine.update_weights(prefixed) == 1 and engine.weight_version == 1
    assert _score_matches(engine, new_model, PROMPTS, responses)
    after = engine.score(PROMPTS, responses)
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    out = engine.generate_batch(PROMPTS, GREEDY)
    for prompt, o in zip(PROMPTS, out):
        assert o.samples[0].token_ids == hf_greedy(new_model, prompt, 12)
        assert o.samples[0].weight_version == 1
    assert engine.update_weights(named, version=7) == 7
    assert engine.generate_batch(PROMPTS[:1], GREEDY)[0].samples[0].weight_version == 7


def test_bad_updates_change_nothing(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    reference = engine.generate_batch(PROMPTS, GREEDY)
    _, named = perturbed(model)
    nan = dict(named)
    nan["model.layers.1.mlp.up_proj.weight"] = nan["model.layers.1.mlp.up_proj.weight"].clone()
    nan["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    cases = [
        (named + [("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))],
         {}, r"unknown tensors: model\.layers\.9"),
        (named[:-1] + [(named[-1][0], torch.zeros(3, 3))], {}, r"wrong_shape tensors: "),
        (list(nan.items()), {}, r"non_finite tensors: model\.layers\.1\.mlp\.up_proj"),
        (named[:5], dict(partial=False), r"missing tensors: "),
        (named, dict(inflight="later"), r"^inflight: "),
        (named, dict(version=-2), r"^version: "),
    ]
    for tensors, options, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.update_weights(tensors, **options)
        assert engine.weight_version == 0
    assert [o.samples[0].token_ids for o in engine.generate_batch(PROMPTS, GREEDY)] == \
        [o.samples[0].token_ids for o in reference]
    engine.update_weights(list(nan.items()), check_finite=False)  # the check can be turned off
    assert engine.weight_version == 1


def test_update_from_disk_and_tied_embeddings(checkpoints, tmp_path):
    model_dir, model = checkpoints["qwen2"]  # tied embeddings
    engine = RolloutEngine(model_dir, show_progress=False)
    new_model, _ = perturbed(model, seed=4)
    new_model.save_pretrained(tmp_path)
    assert engine.update_weights_from_disk(str(tmp_path)) == 1
    assert _score_matches(engine, new_model, PROMPTS, [[9, 10, 11], [12]])
    head = engine.core.model.lm_head.weight
    assert head.data_ptr() == engine.core.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(head, new_model.model.embed_tokens.weight)


def test_reset_prefix_cache(llama):
    engine = RolloutEngine(llama[0], show_progress=False)
    engine.generate_batch(PROMPTS, GREEDY)
    engine.reset_prefix_cache()
    hits = engine.stats()["prefix_cache_hit_tokens"]
    engine.generate_batch(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=2))
    assert engine.stats()["prefix_cache_hit_tokens"] == hits


def _start(engine, steps, params):
    seqs = engine.core.add_request("r", PROMPTS[0], params)
    for _ in range(steps):
        engine.core.step()
    return seqs


def _drain(engine, seqs):
    while not all(s.is_finished for s in seqs):
        engine.core.step()


def test_inflight_recompute_continues_under_new_weights(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    params = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True)
    seqs = _start(engine, 8, params)
    done_before = [s.num_output_tokens for s in seqs]
    new_model, named = perturbed(model)
    engine.update_weights(named, inflight="recompute")
    assert all(s.num_computed_tokens == 0 for s in seqs)  # KV will be recomputed
    _drain(engine, seqs)
    for seq, k in zip(seqs, done_before):
        assert seq.finish_reason == "length"
        assert seq.version_spans == [[0, 0, k], [1, k, 20]]
        prefix = seq.token_ids[:seq.num_prompt_tokens + k]
        assert seq.output_token_ids[k:] == hf_greedy(new_model, prefix, 20 - k)
    assert engine.stats()["free_kv_blocks"] == engine.stats()["num_kv_blocks"]


def test_inflight_keep_continues_on_old_kv(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, ignore_eos=True, seed=0)
    seqs = _start(engine, 8, params)
    computed = [s.num_computed_tokens for s in seqs]
    engine.update_weights(perturbed(model)[1], inflight="keep")
    assert [s.num_computed_tokens for s in seqs] == computed
    cached_before = len(engine.core.block_manager.cached)
    _drain(engine, seqs)
    assert len(engine.core.block_manager.cached) == cached_before == 0  # mixed KV never cached
    k = computed[0] - seqs[0].num_prompt_tokens + 1
    assert [s.version_spans for s in seqs] == [[[0, 0, k], [1, k, 20]]] * 2


def test_inflight_abort_ends_samples_with_tokens_so_far(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False, max_num_seqs=2)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True)
    seqs = _start(engine, 6, params)  # two running, one waiting
    engine.update_weights(perturbed(model)[1], inflight="abort")
    finished = engine.core.step()
    assert set(map(id, finished)) == set(map(id, seqs))
    assert all(s.finish_reason == "abort" for s in seqs)
    assert sorted(s.num_output_tokens for s in seqs)[-1] == 6
    assert engine.stats()["free_kv_blocks"] == engine.stats()["num_kv_blocks"]


def test_sleep_and_wake_up_around_a_weight_update(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    engine.generate_batch(PROMPTS, GREEDY)
    engine.sleep(offload_weights=True)
    assert engine.core.kv_cache is None
    with pytest.raises(RuntimeError, match="asleep: call wake_up"):
        engine.generate_batch(PROMPTS, GREEDY)
    new_model, named = perturbed(model, seed=6)
    assert engine.update_weights(named) == 1  # applies while asleep
    engine.wake_up()
    outs = engine.generate_batch(PROMPTS, GREEDY)
    assert [o.samples[0].token_ids for o in outs] == [hf_greedy(new_model, p, 12) for p in PROMPTS]
    assert engine.stats()["free_kv_blocks"] == engine.stats()["num_kv_blocks"]
