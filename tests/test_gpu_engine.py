"""The GPU engine (Triton kernels, CUDA graphs) against transformers; skipped without CUDA."""
import pytest
import torch

from atom_rollout import RolloutEngine, SamplingParams
from conftest import hf_greedy, hf_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 9, 14, 3], [7] * 21, list(range(10, 47))]


@pytest.mark.parametrize("variant", ["llama3_mqa", "qwen3", "qwen2"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_fp32_gpu_engine_matches_transformers(checkpoints, variant, eager):
    model_dir, model = checkpoints[variant]
    engine = RolloutEngine(model_dir, device="cuda", dtype="float32", enforce_eager=eager,
                           show_progress=False, max_num_seqs=8)
    assert engine.stats()["kernel_backend"] == "triton"
    outs = engine.generate_batch(PROMPTS, SamplingParams(temperature=0, max_tokens=16,
                                                         ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 16)
    sampled = engine.generate_batch(PROMPTS, SamplingParams(n=2, max_tokens=12,
                                                            ignore_eos=True, seed=0))
    for prompt, out in zip(PROMPTS, sampled):
        for sample in out.samples:
            logits = hf_logits(model, prompt + sample.token_ids)[len(prompt) - 1:-1]
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.token_ids)[:, None])
            assert torch.allclose(torch.tensor(sample.logprobs), ref[:, 0], atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_engine_on_a_gpu_that_is_not_current(checkpoints):
    """A trainer on cuda:0 with its engine on cuda:1 in the same process: every kernel
    must launch on the engine's GPU."""
    model_dir, model = checkpoints["qwen3"]
    torch.cuda.set_device(0)
    engine = RolloutEngine(model_dir, device="cuda:1", dtype="float32", show_progress=False,
                           max_num_seqs=8)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = engine.generate_batch(PROMPTS, greedy)
    for prompt, out in zip(PROMPTS, outs):
        assert out.samples[0].token_ids == hf_greedy(model, prompt, 8)
    named = [(n, p.detach().to("cuda:0")) for n, p in model.named_parameters()]
    assert engine.update_weights(named) == 1
    assert torch.cuda.current_device() == 0
