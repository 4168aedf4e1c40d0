"""Ray path for trainers: the engine in a RolloutWorker actor, driven like any other
caller of atom_rollout.rl (generate over Ray, weights by broadcast to the actor).

    caller = ray_caller("model_dir", num_gpus=1)
    atom_rollout.rl.train(TrainConfig(model_dir, sync="broadcast"), caller)
"""
from __future__ import annotations

from .ray_worker import start_rollout_workers


class RayCaller:
    """Runs RolloutEngine methods on one RolloutWorker actor; `result()` is ray.get."""

    def __init__(self, worker):
        self.worker = worker

    def submit(self, method: str, *args, **kwargs):
        import ray
        ref = getattr(self.worker, method).remote(*args, **kwargs)
        return _Ref(ray, ref)

    def close(self) -> None:
        import ray
        ray.kill(self.worker)


class _Ref:
    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref

    def result(self):
        return self.ray.get(self.ref)


def ray_caller(model_dir: str, num_gpus: float | None = None, **engine_options) -> RayCaller:
    """Start one worker (ray.init() first if Ray is not running); num_gpus defaults to 1
    for a CUDA engine device, else 0."""
    import ray
    if not ray.is_initialized():
        ray.init()
    if num_gpus is None:
        num_gpus = 1 if str(engine_options.get("device", "")).startswith("cuda") else 0
    if num_gpus:
        engine_options["device"] = "cuda"  # the actor sees only the GPU Ray gave it
    [worker] = start_rollout_workers(model_dir, 1, num_gpus=num_gpus, **engine_options)
    return RayCaller(worker)
