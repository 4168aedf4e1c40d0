"""RolloutWorker through a local Ray cluster bound to loopback (CPU)."""
import os

import pytest

ray = pytest.importorskip("ray")

from atom_rollout import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_cluster():
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylet and its workers inherit these
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20, _node_ip_address="127.0.0.1")
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_generate_score_and_update_weights_through_the_actor(ray_cluster, llama, llama_engine):
    from integrations.ray_worker import start_rollout_workers
    [worker] = start_rollout_workers(llama[0], num_workers=1, num_gpus=0, num_kv_blocks=128)
    params = SamplingParams(n=2, max_tokens=6, seed=4)
    outs = ray.get(worker.generate_batch.remote([[1, 5, 6]], params))
    expected = llama_engine.generate_batch([[1, 5, 6]], params)
    assert [s.token_ids for s in outs[0].samples] == [s.token_ids for s in expected[0].samples]
    scores = ray.get(worker.score.remote([[1, 5]], [[6, 7]]))
    assert scores[0].shape == (2,)
    health = ray.get(worker.health.remote())
    assert health["status"] == "ok" and health["free_kv_blocks"] == health["num_kv_blocks"]
    state = {name: p.detach() for name, p in llama[1].named_parameters()}
    version = ray.get(worker.update_weights.remote(state))
    assert version == ray.get(worker.weight_version.remote()) == 1
    out = ray.get(worker.generate_batch.remote([[1, 5, 6]], params))
    assert out[0].samples[0].weight_version == 1
    ray.get(worker.reset_prefix_cache.remote())
    ray.kill(worker)


def test_bad_worker_count_is_rejected(ray_cluster, llama):
    from integrations.ray_worker import start_rollout_workers
    with pytest.raises(ValueError, match="num_workers"):
        start_rollout_workers(llama[0], num_workers=0, num_gpus=0)
