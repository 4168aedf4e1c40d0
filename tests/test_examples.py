"""The RL examples end to end on CPU: GRPO (in-process and broadcast sync), PPO, demo."""
import os

import pytest
import torch

from atom_rollout.rl import TaskConfig, TrainConfig, train
from atom_rollout.rl.demo import DEMO_MODEL, main as demo_main
from atom_rollout.rl.ppo import gae

TOLERANCE = 1e-4  # fp32 trainer vs engine, per token


def config(**overrides) -> TrainConfig:
    base = dict(model_dir=DEMO_MODEL, steps=3, prompts_per_step=8, n=4, max_tokens=5,
                optimizer="sgd", lr=0.1, tasks=TaskConfig(num=64), echo=False,
                engine_options={"num_kv_blocks": 64})
    return TrainConfig(**{**base, **overrides})


def check_loop(records: list[dict], steps: int) -> None:
    assert [r["step"] for r in records] == list(range(steps))
    for step, r in enumerate(records):
        # Step k samples with the weights of update k, and the trainer (which has moved:
        # grad_norm > 0) recomputes the same logprobs, so the engine holds its weights.
        assert r["rollout_weight_version"] == step
        assert r["mismatch_max"] <= TOLERANCE, r
        assert 1 - TOLERANCE <= r["ratio_min"] <= r["ratio_max"] <= 1 + TOLERANCE
        assert 0 <= r["reward_mean"] <= 1 and r["response_len"] > 0
    assert all(r["grad_norm"] > 0 for r in records)


def test_grpo_inprocess_with_top_k_top_p(tmp_path):
    records = train(config(top_k=8, top_p=0.9, temperature=0.8, out_dir=str(tmp_path)))
    check_loop(records, 3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for key in ("rollout_s", "train_s", "sync_s", "mismatch_mean", "reward_mean"):
        assert key in records[0]


def test_grpo_broadcast_engine_in_another_process():
    records = train(config(sync="broadcast"))
    check_loop(records, 3)


def test_ppo_steps():
    records = train(config(algorithm="ppo", steps=2, epochs=2))
    check_loop(records, 2)
    assert "value_mean" in records[0]


def test_gae_with_reward_on_last_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lambda = 1, gamma = 1: advantage = return - value; padding stays 0.
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5], [0.8, 0.8, 0.0]]))


def test_demo_model_is_small_and_loads():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    size = sum(os.path.getsize(os.path.join(DEMO_MODEL, f)) for f in os.listdir(DEMO_MODEL))
    assert size < 5 * 2**20
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    assert tokenizer.decode(tokenizer.encode("12+34=", add_special_tokens=False)) == "12+34="


def test_demo_command_runs(capsys):
    from atom_rollout.cli import COMMANDS
    assert COMMANDS["demo"] == "atom_rollout.rl.demo"
    demo_main(["--steps", "2"])
    assert "reward (mean of 1 steps)" in capsys.readouterr().out


def test_bad_sync_mode_is_rejected():
    with pytest.raises(ValueError, match="sync"):
        train(config(sync="ipc"))  # ipc needs CUDA
