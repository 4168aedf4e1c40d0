"""Bad input raises ValueError naming the field; the engine keeps working."""
import json

import pytest

from atom_rollout import RolloutEngine, SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2.0), "min_p"), (dict(min_tokens=-1), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(seed="x"), "seed"), (dict(n=1.5), "n"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_bad_requests_raise_and_engine_keeps_working(llama_engine):
    engine = llama_engine
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    before = engine.generate_batch([[4, 5, 6]], greedy)[0].samples[0].token_ids
    cases = [
        (lambda: engine.generate_batch([[4, 5], []], greedy), r"prompts\[1\]: empty"),
        (lambda: engine.generate_batch([[4] * 256], greedy), r"prompts\[0\]: length"),
        (lambda: engine.generate_batch([[4, 97]], greedy), r"prompts\[0\]: token id 97"),
        (lambda: engine.generate_batch([[4, -1]], greedy), r"prompts\[0\]: token id -1"),
        (lambda: engine.generate_batch([], greedy), r"prompts: empty"),
        (lambda: engine.generate_batch("abc", greedy), r"prompts: expected a list"),
        (lambda: engine.generate_batch([[4], [5]], [greedy]), r"params: "),
        (lambda: engine.score([[4, 5]], [[6], [7]]), r"response_ids: 2 responses for 1"),
        (lambda: engine.score([[4, 5]], [[6, 200]]), r"response_ids\[0\]: token id 200"),
        (lambda: engine.score([[4, 5]], [[6] * 255]), r"response_ids\[0\]: length"),
        (lambda: engine.score([[4, 5]], [[6]], temperature=0), r"temperature: "),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert engine.stats()["free_kv_blocks"] == engine.stats()["num_kv_blocks"]
    assert engine.generate_batch([[4, 5, 6]], greedy)[0].samples[0].token_ids == before


def test_bad_engine_options(llama):
    with pytest.raises(ValueError, match="^max_num_seqz: unknown engine option"):
        RolloutEngine(llama[0], max_num_seqz=4)
    with pytest.raises(ValueError, match="^block_size: "):
        RolloutEngine(llama[0], block_size=0)
    with pytest.raises(ValueError, match="^dtype: "):
        RolloutEngine(llama[0], dtype="float8")
    with pytest.raises(ValueError, match="^num_kv_blocks: "):
        RolloutEngine(llama[0], num_kv_blocks=3)
    with pytest.raises(ValueError, match="^max_model_len: "):
        RolloutEngine(llama[0], max_model_len=100000)
    with pytest.raises(ValueError, match="^kernel_backend: "):
        RolloutEngine(llama[0], kernel_backend="cuda-magic")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2,
               architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"]
    with pytest.raises(ValueError, match="architectures: .*GPT2LMHeadModel.*supported: "
                                         "LlamaForCausalLM, MistralForCausalLM"):
        RolloutEngine(str(tmp_path))


def test_auto_device_follows_the_environment(llama, monkeypatch):
    from atom_rollout import EngineConfig
    config = EngineConfig(model_dir=llama[0])
    monkeypatch.setenv("ATOM_ROLLOUT_DEVICE", "meta")
    assert config.torch_device().type == "meta"
    monkeypatch.setenv("ATOM_ROLLOUT_DEVICE", "warp-drive")
    with pytest.raises(ValueError, match="ATOM_ROLLOUT_DEVICE"):
        config.torch_device()
    assert EngineConfig(model_dir=llama[0], device="cpu").torch_device().type == "cpu"
