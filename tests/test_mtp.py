"""MTP layers: loading in both checkpoint layouts, weight updates, and the layer's math."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.kernels import AttentionMetadata, TorchOps
from atom_rollout.models import WeightMap, build_model
from models import build_checkpoint, make_config

NUM_LAYERS = 2  # tests/models.py BASE


def mtp_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Random MTP weights in our layout, named and shaped by the model itself."""
    config = make_config("llama", num_nextn_predict_layers=1, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    names = [n for n in WeightMap(model).targets if n.startswith("mtp.")]
    targets = WeightMap(model).targets
    return {n: (torch.randn(targets[n].shape, generator=gen) * 0.1
                + (1.0 if "norm" in n else 0.0)) for n in names}


def _with_mtp(path, tensors: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "mtp.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _deepseek_layout(tensors: dict[str, torch.Tensor], hidden: int, vocab: int):
    renamed = {n.replace("mtp.layers.0.", f"model.layers.{NUM_LAYERS}."): t
               for n, t in tensors.items()}
    renamed[f"model.layers.{NUM_LAYERS}.embed_tokens.weight"] = torch.zeros(vocab, hidden)
    renamed[f"model.layers.{NUM_LAYERS}.shared_head.head.weight"] = torch.zeros(vocab, hidden)
    return renamed


def _mtp_params(engine) -> dict[str, torch.Tensor]:
    weight_map = engine.core.weight_map
    return {n: t.view().clone() for n, t in weight_map.targets.items() if n.startswith("mtp.")}


@pytest.mark.parametrize("layout", ["ours", "deepseek"])
def test_checkpoint_with_mtp_loads_and_generation_is_unchanged(tmp_path, llama, layout):
    build_checkpoint(tmp_path, "llama")
    tensors = mtp_tensors(seed=1)
    on_disk = tensors if layout == "ours" else _deepseek_layout(tensors, 64, 97)
    engine = RolloutEngine(_with_mtp(tmp_path, on_disk), show_progress=False)
    loaded = _mtp_params(engine)
    assert loaded.keys() == tensors.keys() and len(loaded) > 10
    assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = RolloutEngine(llama[0], show_progress=False)
    assert (engine.generate_batch([[4, 5, 6]], greedy)[0].samples[0].token_ids
            == plain.generate_batch([[4, 5, 6]], greedy)[0].samples[0].token_ids)


def test_mtp_weights_are_ordinary_update_targets(tmp_path):
    model = build_checkpoint(tmp_path, "llama")
    engine = RolloutEngine(_with_mtp(tmp_path, mtp_tensors(seed=1)), show_progress=False)
    main = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"missing tensors: mtp\.layers\.0\."):
        engine.update_weights(main, partial=False)
    fresh = mtp_tensors(seed=2)
    deepseek = _deepseek_layout(fresh, 64, 97)
    assert engine.update_weights(main + list(deepseek.items()), partial=False) == 1
    assert all(torch.equal(_mtp_params(engine)[n], fresh[n]) for n in fresh)


def test_mtp_layer_matches_its_definition(tmp_path):
    """enorm(embed) ++ hnorm(hidden) -> eh_proj -> a Llama decoder block -> final norm,
    checked against transformers' LlamaDecoderLayer holding the same block weights."""
    build_checkpoint(tmp_path, "llama")
    tensors = mtp_tensors(seed=3)
    engine = RolloutEngine(_with_mtp(tmp_path, tensors), show_progress=False)
    layer, config = engine.core.model.mtp.layers[0], engine.core.hf_config
    gen = torch.Generator().manual_seed(0)
    length, hidden = 7, config.hidden_size
    prev_hidden = torch.randn(length, hidden, generator=gen)
    embeds = torch.randn(length, hidden, generator=gen)
    k_cache = torch.zeros(2, 16, config.num_key_value_heads, 16)
    v_cache = torch.zeros_like(k_cache)
    meta = AttentionMetadata(torch.arange(length), torch.tensor([0, length], dtype=torch.int32),
                             torch.tensor([length], dtype=torch.int32),
                             torch.tensor([[0, 1]], dtype=torch.int32), length, length)
    positions = torch.arange(length)
    got = layer(TorchOps(), prev_hidden, embeds, positions, engine.core.model.cos_sin,
                (k_cache, v_cache), meta)

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    p = {n.removeprefix("mtp.layers.0."): t for n, t in tensors.items()}
    x = torch.cat([rms(embeds, p["enorm.weight"]), rms(prev_hidden, p["hnorm.weight"])], -1)
    x = x @ p["eh_proj.weight"].T
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # causal when no mask is given
    block = LlamaDecoderLayer(config, layer_idx=0).eval()
    block.load_state_dict({n: t for n, t in p.items() if n.split(".")[0] in (
        "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")})
    cos, sin = LlamaRotaryEmbedding(config)(x[None], positions[None])
    with torch.no_grad():
        x = block(x[None], position_embeddings=(cos, sin))[0]
    expected = rms(x, p["shared_head.norm.weight"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
