"""The RL step loop: rollout -> update -> push weights -> log, GRPO or PPO."""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import torch

from ..sampler import SamplingParams
from .engines import Caller, RolloutClient, make_client
from .grpo import GRPO
from .metrics import MetricsLog, plot
from .ppo import PPO
from .rollout import encode_prompt, to_batch
from .tasks import TaskConfig, make_dataset
from .update import UpdateSettings, update_policy

ALGORITHMS = ("grpo", "ppo")


@dataclass
class TrainConfig:
    model_dir: str
    algorithm: str = "grpo"
    steps: int = 20
    prompts_per_step: int = 16
    n: int = 8  # samples per prompt (the GRPO group)
    max_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd (plain SGD is steadier for the tiny demo model)
    warmup_steps: int = 0  # linear lr warm-up: Adam's first steps are sign-like and large
    epochs: int = 1
    micro_batch: int = 64
    clip_low: float = 0.2
    clip_high: float = 0.28
    sync: str = "inprocess"  # inprocess | broadcast | ipc
    device: str = "cpu"  # the trainer's
    engine_device: str | None = None  # default: the trainer's
    dtype: str = "float32"  # the engine's; the trainer keeps fp32 weights, autocasts to it
    tasks: TaskConfig = field(default_factory=TaskConfig)
    dataset_path: str | None = None  # a saved datasets.Dataset instead of generated tasks
    out_dir: str | None = None  # metrics.jsonl and metrics.png go here
    seed: int = 0
    engine_options: dict = field(default_factory=dict)
    echo: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.steps < 1 or self.prompts_per_step < 1 or self.n < 2:
            raise ValueError("steps and prompts_per_step must be >= 1, n >= 2")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, max_tokens=self.max_tokens)


def train(config: TrainConfig, caller: Caller | None = None) -> list[dict]:
    """Run `config.steps` steps; returns the logged records (also in out_dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    policy = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    policy.to(device).train()
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    algorithm = _make_algorithm(config, policy, device)
    optimizer = _make_optimizer(config, list(policy.parameters()) + algorithm.parameters())
    warmup = max(config.warmup_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    dtype = getattr(torch, config.dtype)
    settings = UpdateSettings(config.sampling_params(), config.epochs, config.micro_batch,
                              config.clip_low, config.clip_high,
                              autocast_dtype=None if dtype == torch.float32 else dtype)
    tasks = _load_tasks(config)
    client = make_client(config.sync, config.model_dir, device, caller, dtype=config.dtype,
                         device=config.engine_device or config.device, seed=config.seed,
                         show_progress=False, **config.engine_options)
    out = config.out_dir
    log = MetricsLog(os.path.join(out, "metrics.jsonl") if out else None, config.echo)
    try:
        order = _task_order(len(tasks), config.seed)
        for step in range(config.steps):
            rows = [tasks[order[(step * config.prompts_per_step + i) % len(order)]]
                    for i in range(config.prompts_per_step)]
            log.log(_step(step, rows, policy, tokenizer, algorithm, optimizer, settings,
                          client))
            schedule.step()
    finally:
        client.close()
    if out and plot(log.records, os.path.join(out, "metrics.png")) and config.echo:
        print(f"wrote {out}/metrics.jsonl and metrics.png")
    return log.records


def _step(step: int, rows: list[dict], policy, tokenizer, algorithm, optimizer,
          settings: UpdateSettings, client: RolloutClient) -> dict:
    device = next(policy.parameters()).device
    start = time.perf_counter()
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in rows]
    outputs = client.generate(prompts, settings.params)
    batch = to_batch(outputs, [row["answer"] for row in rows], tokenizer,
                     settings.params.n)
    rolled = time.perf_counter()
    stats = update_policy(policy, algorithm, optimizer, batch, settings)
    _synchronize(device)
    trained = time.perf_counter()
    client.push(policy.named_parameters(), version=step + 1)
    _synchronize(device)
    synced = time.perf_counter()
    return {"step": step, "reward_mean": batch.rewards.mean().item(),
            "response_len": batch.mean_response_length(), **stats,
            "rollout_s": rolled - start, "train_s": trained - rolled, "sync_s": synced - trained,
            "rollout_weight_version": min(batch.weight_versions)}


def _make_algorithm(config: TrainConfig, policy, device: torch.device):
    if config.algorithm == "ppo":
        return PPO(policy.config.hidden_size, device, micro_batch=config.micro_batch)
    return GRPO()


def _make_optimizer(config: TrainConfig, params: list) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    raise ValueError(f"optimizer: {config.optimizer!r} is not one of adamw, sgd")


def _load_tasks(config: TrainConfig):
    if config.dataset_path:
        import datasets
        return datasets.load_from_disk(config.dataset_path)
    return make_dataset(config.tasks)


def _task_order(num: int, seed: int) -> list[int]:
    order = list(range(num))
    random.Random(seed).shuffle(order)
    return order


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
