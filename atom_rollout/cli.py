"""The atom-rollout command line."""
from __future__ import annotations

import sys

COMMANDS = {"bench": "atom_rollout.bench.__main__", "serve": "atom_rollout.server.__main__",
            "demo": "atom_rollout.rl.demo"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: atom-rollout {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    import importlib
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
