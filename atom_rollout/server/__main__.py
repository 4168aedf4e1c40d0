"""atom-rollout serve MODEL_DIR: the OpenAI-compatible server with RL endpoints."""
from __future__ import annotations

import argparse
import json
import os
import socket

import uvicorn

from ..engine.async_engine import AsyncRolloutEngine
from .app import build_app


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atom-rollout serve", description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists "
                             "(default: the directory name)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineConfig field, e.g. -o max_num_seqs=128 (JSON values)")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def engine_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key in ("dtype", "device"):
            raise SystemExit(f"--option: expected KEY=VALUE (dtype and device have their "
                             f"own flags), got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv=None) -> None:
    args = parse_args(argv)
    engine = AsyncRolloutEngine(args.model_dir, dtype=args.dtype, device=args.device,
                                **engine_options(args.option))
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    app = build_app(engine, name, owns_engine=True)
    sock = socket.create_server((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"atom-rollout: serving {name} on http://{host}:{port}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
