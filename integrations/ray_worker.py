"""RolloutWorker: the RolloutEngine behind a Ray actor placed on a GPU by Ray resources.

    workers = start_rollout_workers("model_dir", num_workers=4, num_gpus=1)
    outs = ray.get([w.generate_batch.remote(prompts, params) for w in workers])

Ray is optional: it is imported only when workers are started.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from atom_rollout import RolloutEngine, RolloutOutput, SamplingParams


class RolloutWorker:
    """The engine's trainer-facing methods; run as a Ray actor (see start_rollout_workers)."""

    def __init__(self, model_dir: str, **engine_options):
        engine_options.setdefault("show_progress", False)
        self.engine = RolloutEngine(model_dir, **engine_options)

    def generate_batch(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None
                       ) -> list[RolloutOutput]:
        return self.engine.generate_batch(prompts, params)

    def score(self, prompt_ids, response_ids, temperature: float = 1.0) -> list[torch.Tensor]:
        return self.engine.score(prompt_ids, response_ids, temperature)

    def update_weights(self, named_tensors, **options) -> int:
        """``named_tensors``: (name, tensor) pairs or a dict; options as RolloutEngine's."""
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        return self.engine.update_weights(list(items), **options)

    def update_weights_from_disk(self, path: str, **options) -> int:
        return self.engine.update_weights_from_disk(path, **options)

    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                         world_size: int, backend: str = "nccl") -> None:
        return self.engine.init_weight_sync(master_address, master_port, rank_offset,
                                            world_size, backend)

    def receive_weights(self, timeout_s: float | None = None) -> int:
        return self.engine.receive_weights(timeout_s)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def weight_version(self) -> int:
        return self.engine.weight_version

    def health(self) -> dict:
        return {"status": "ok", "device": str(self.engine.core.device),
                **self.engine.stats()}


def start_rollout_workers(model_dir: str, num_workers: int, num_gpus: float = 1.0,
                          num_cpus: float = 1.0, ray_options: dict | None = None,
                          **engine_options) -> list:
    """Start ``num_workers`` RolloutWorker actors, each holding ``num_gpus`` GPUs (its engine
    then runs on the GPU Ray assigned; num_gpus=0 runs on CPU). Blocks until every engine
    is loaded, so a bad model directory fails here."""
    import ray
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers: must be a positive integer, got {num_workers!r}")
    actor = ray.remote(RolloutWorker).options(num_gpus=num_gpus, num_cpus=num_cpus,
                                              **(ray_options or {}))
    if num_gpus == 0:
        engine_options.setdefault("device", "cpu")
    workers = [actor.remote(model_dir, **engine_options) for _ in range(num_workers)]
    ray.get([w.weight_version.remote() for w in workers])
    return workers
