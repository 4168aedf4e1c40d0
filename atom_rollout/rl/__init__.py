"""RL training on the rollout engine: the pieces examples/grpo.py, examples/ppo.py and
`atom-rollout demo` share (tasks, rollouts, trainer-side logprobs, losses, weight push,
metrics, the step loop)."""
from .loop import TrainConfig, train
from .tasks import TaskConfig, arithmetic_rows, make_dataset, reward

__all__ = ["TaskConfig", "TrainConfig", "arithmetic_rows", "make_dataset", "reward", "train"]
