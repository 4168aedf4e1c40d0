"""Trainer -> engine weight broadcast over Gloo, trainer in another process."""
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from atom_rollout import RolloutEngine, SamplingParams
from atom_rollout.weight_sync import WeightSender, WeightSyncError
from test_weight_updates import PROMPTS, _score_matches, perturbed

CTX = mp.get_context("spawn")
RESPONSES = [[9, 10, 11, 12], [13, 14]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(model_dir: str, port: int, seeds: list[int], die_mid_stream: bool, done) -> None:
    """A trainer process: its own transformers model, perturbed and broadcast per seed."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sender = WeightSender("127.0.0.1", port, world_size=2, backend="gloo",
                          bucket_bytes=32 * 1024, timeout_s=30)
    if die_mid_stream:
        broadcast = sender._group.broadcast
        calls = []

        def dying(tensor, deadline):
            calls.append(1)
            if len(calls) > 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return broadcast(tensor, deadline)
        sender._group.broadcast = dying
    for seed in seeds:
        new_model, _ = perturbed(model, seed=seed)
        prefixed = [(f"module.{n}", t) for n, t in new_model.named_parameters()]
        sender.send(prefixed, version=10 + seed)
    done.wait(60)
    sender.close()


def _spawn(*args):
    done = CTX.Event()
    proc = CTX.Process(target=trainer, args=(*args, done), daemon=True)
    proc.start()
    return proc, done


def test_broadcast_updates_engine(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    before = engine.score(PROMPTS, RESPONSES)
    engine.generate_batch(PROMPTS, SamplingParams(temperature=0, max_tokens=4))
    port = free_port()
    proc, done = _spawn(model_dir, port, [1, 2], False)
    try:
        engine.init_weight_sync("127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo",
                                timeout_s=60)
        for seed in (1, 2):
            assert engine.receive_weights(timeout_s=60) == 10 + seed
            assert _score_matches(engine, perturbed(model, seed=seed)[0], PROMPTS, RESPONSES)
        after = engine.score(PROMPTS, RESPONSES)
        assert not torch.allclose(before[0], after[0], atol=1e-3)
        out = engine.generate_batch(PROMPTS[:1], SamplingParams(max_tokens=3))
        assert out[0].samples[0].weight_version == 12
    finally:
        done.set()
        proc.join(30)


def test_trainer_killed_mid_stream_keeps_old_weights(checkpoints):
    model_dir, _ = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = engine.generate_batch(PROMPTS, greedy)
    port = free_port()
    proc, done = _spawn(model_dir, port, [1], True)
    try:
        engine.init_weight_sync("127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo",
                                timeout_s=10)
        with pytest.raises(WeightSyncError):
            engine.receive_weights(timeout_s=10)
    finally:
        done.set()
        proc.join(30)
    assert engine.weight_version == 0
    again = engine.generate_batch(PROMPTS, greedy)
    assert [o.samples[0].token_ids for o in again] == [o.samples[0].token_ids for o in reference]
