"""Per-step metrics: one JSON line per step, a console line, and a plot at the end."""
from __future__ import annotations

import json
import os

_CONSOLE = [("step", "{:>4d}"), ("reward_mean", "reward {:.3f}"), ("response_len", "len {:.1f}"),
            ("mismatch_mean", "|d| mean {:.1e}"), ("mismatch_max", "max {:.1e}"),
            ("ratio_min", "ratio [{:.4f}"), ("ratio_max", "{:.4f}]"),
            ("rollout_s", "rollout {:.2f}s"), ("train_s", "train {:.2f}s"),
            ("sync_s", "sync {:.2f}s")]


class MetricsLog:
    def __init__(self, path: str | None = None, echo: bool = True):
        self.path, self.echo = path, echo
        self.records: list[dict] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.echo:
            print(console_line(record), flush=True)


def console_line(record: dict) -> str:
    return "  ".join(fmt.format(record[key]) for key, fmt in _CONSOLE if key in record)


def plot(records: list[dict], path: str) -> bool:
    """Reward and mismatch vs step; False (and nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["reward_mean"] for r in records])
    top.set_ylabel("reward mean")
    bottom.semilogy(steps, [max(r["mismatch_mean"], 1e-12) for r in records], label="mean |d|")
    bottom.semilogy(steps, [max(r["mismatch_max"], 1e-12) for r in records], label="max |d|")
    bottom.set_ylabel("trainer vs rollout logprob")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
