"""Trainer -> engine weight broadcast over Gloo, trainer in another process."""
import os
import signal
import socket
import time

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
                time.sleep(1.0)  # let the buckets already posted reach the receiver
                os.kill(os.getpid(), signal.SIGKILL)
            return broadcast(tensor, deadline)
        sender._group.broadcast = dying
    for seed in seeds:
        new_model, _ = perturbed(model, seed=seed)
        prefixed = [(f"module.{n}", t) for n, t in new_model.named_parameters()]
        sender.send(prefixed, version=10 + seed)
    done.wait(60)
    sender.close()


def bad_then_good_trainer(model_dir: str, port: int, done) -> None:
    """Sends an update with NaN in its last bucket, one with an unknown name, then a good
    one (seed 3): the receiver must reject the first two and stay usable."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sender = WeightSender("127.0.0.1", port, world_size=2, backend="gloo",
                          bucket_bytes=32 * 1024, timeout_s=30)
    good = [(n, t.detach()) for n, t in perturbed(model, seed=3)[0].named_parameters()]
    nan = [(n, t.clone()) for n, t in good]
    nan[-1][1].view(-1)[0] = float("nan")
    sender.send(nan, version=20)
    sender.send(good + [("model.layers.0.mlp.extra.weight", torch.zeros(3))], version=21)
    sender.send(good, version=22)
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
        for seed, stream in ((1, True), (2, False)):  # written as it lands / staged
            assert engine.receive_weights(timeout_s=60, stream=stream) == 10 + seed
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
    scores = engine.score(PROMPTS, RESPONSES)
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
    for before, after in zip(scores, engine.score(PROMPTS, RESPONSES)):
        assert torch.equal(before, after)  # the buckets that did land were undone


def test_bad_broadcasts_change_nothing_and_receiver_stays_usable(checkpoints):
    model_dir, model = checkpoints["llama"]
    engine = RolloutEngine(model_dir, show_progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = engine.generate_batch(PROMPTS, greedy)
    port, done = free_port(), CTX.Event()
    proc = CTX.Process(target=bad_then_good_trainer, args=(model_dir, port, done), daemon=True)
    proc.start()
    try:
        engine.init_weight_sync("127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo",
                                timeout_s=60)
        with pytest.raises(ValueError, match="non_finite tensors: lm_head.weight"):
            engine.receive_weights(timeout_s=60)  # earlier buckets were written, then undone
        again = engine.generate_batch(PROMPTS, greedy)
        assert [o.samples[0].token_ids for o in again] == \
            [o.samples[0].token_ids for o in reference]
        with pytest.raises(ValueError, match="unknown tensors: model.layers.0.mlp.extra"):
            engine.receive_weights(timeout_s=60)
        assert engine.weight_version == 0
        assert engine.receive_weights(timeout_s=60) == 22
        assert _score_matches(engine, perturbed(model, seed=3)[0], PROMPTS, RESPONSES)
    finally:
        done.set()
        proc.join(30)
