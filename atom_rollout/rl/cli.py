"""Command line shared by examples/grpo.py and examples/ppo.py."""
from __future__ import annotations

import argparse
import dataclasses

from .engines import SYNC_MODES
from .loop import TrainConfig, train
from .tasks import TaskConfig

_SKIP = {"model_dir", "algorithm", "tasks", "engine_options", "echo"}


def build_parser(algorithm: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"{algorithm.upper()} on the rollout engine")
    parser.add_argument("--model", required=True, help="HF model directory")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _SKIP:
            _add(parser, f, "")
    for f in dataclasses.fields(TaskConfig):
        _add(parser, f, "task-")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--ray", action="store_true",
                        help="engine in a Ray RolloutWorker actor (needs --sync broadcast)")
    return parser


def _add(parser: argparse.ArgumentParser, f: dataclasses.Field, prefix: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else None
    kind = type(default) if default is not None else str
    choices = SYNC_MODES if f.name == "sync" else None
    parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", type=kind, default=default,
                        choices=choices)


def config_from_args(args: argparse.Namespace, algorithm: str) -> TrainConfig:
    values = vars(args)
    tasks = TaskConfig(**{f.name: values[f"task_{f.name}"] for f in dataclasses.fields(TaskConfig)})
    options = {name: values[name] for name in ("num_kv_blocks", "max_model_len")
               if values[name] is not None}
    own = {f.name: values[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in _SKIP}
    return TrainConfig(model_dir=args.model, algorithm=algorithm, tasks=tasks,
                       engine_options=options, **own)


def main(algorithm: str, argv: list[str] | None = None) -> list[dict]:
    args = build_parser(algorithm).parse_args(argv)
    config = config_from_args(args, algorithm)
    caller = None
    if args.ray:
        from integrations.ray_rollout import ray_caller  # the repository's integrations/
        caller = ray_caller(config.model_dir, device=config.engine_device or config.device,
                            dtype=config.dtype, seed=config.seed, **config.engine_options)
    return train(config, caller)
