"""Verifiable arithmetic tasks, generated offline by our own generator, and their reward.

A row is {"prompt": str, "answer": str}. The reward is exact match on the answer: the
last integer in the response must equal it (so a chatty "The answer is 12." counts, a
wrong or missing number does not).

    python -m atom_rollout.rl.tasks out_dir --num 5000 --digits 2   # a saved datasets.Dataset
"""
from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class TaskConfig:
    num: int = 4096
    digits: int = 2  # operands have at most this many digits
    ops: str = "+"
    template: str = "{a}{op}{b}="  # chat models: e.g. "What is {a} {op} {b}? ..."
    seed: int = 0


def arithmetic_rows(config: TaskConfig) -> list[dict]:
    """`config.num` distinct-as-sampled problems; same config, same rows."""
    unknown = set(config.ops) - set(_OPS)
    if unknown or not config.ops:
        raise ValueError(f"ops: {config.ops!r} must be made of {''.join(_OPS)}")
    if config.digits < 1:
        raise ValueError(f"digits: must be >= 1, got {config.digits}")
    rng = random.Random(config.seed)
    high = 10 ** config.digits - 1
    rows = []
    for _ in range(config.num):
        a, b, op = rng.randint(0, high), rng.randint(0, high), rng.choice(config.ops)
        rows.append({"prompt": config.template.format(a=a, b=b, op=op),
                     "answer": str(_OPS[op](a, b))})
    return rows


def make_dataset(config: TaskConfig):
    """The rows as a `datasets.Dataset` when `datasets` is installed, else as a list
    (both are indexed the same way: len(), [i]["prompt"])."""
    rows = arithmetic_rows(config)
    try:
        import datasets
    except ImportError:
        return rows
    return datasets.Dataset.from_list(rows)


def reward(response: str, answer: str) -> float:
    numbers = _INTEGER.findall(response)
    return float(bool(numbers) and numbers[-1] == answer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save arithmetic tasks as a datasets.Dataset")
    parser.add_argument("out_dir")
    parser.add_argument("--num", type=int, default=TaskConfig.num)
    parser.add_argument("--digits", type=int, default=TaskConfig.digits)
    parser.add_argument("--ops", default=TaskConfig.ops)
    parser.add_argument("--template", default=TaskConfig.template)
    parser.add_argument("--seed", type=int, default=TaskConfig.seed)
    args = parser.parse_args(argv)
    import datasets
    config = TaskConfig(args.num, args.digits, args.ops, args.template, args.seed)
    datasets.Dataset.from_list(arithmetic_rows(config)).save_to_disk(args.out_dir)


if __name__ == "__main__":
    main()
