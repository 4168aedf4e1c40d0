"""Where the rollout engine runs (this process, a child process, a Ray actor) and how
the trainer's new weights reach it (in-process update, broadcast, CUDA IPC).

A *caller* runs engine methods by name: `caller.submit("generate_batch", ...)` returns
a pending call whose `result()` waits for it. Submitting before waiting is what lets
the trainer broadcast while the engine is inside `receive_weights`.
"""
from __future__ import annotations

import multiprocessing
import socket
import traceback
from typing import Iterable, Protocol

import torch

from ..engine import RolloutEngine, RolloutOutput
from ..sampler import SamplingParams

SYNC_MODES = ("inprocess", "broadcast", "ipc")
_TIMEOUT_S = 600.0
NamedTensors = Iterable[tuple[str, torch.Tensor]]


class Pending(Protocol):
    def result(self): ...


class Caller(Protocol):
    def submit(self, method: str, *args, **kwargs) -> Pending: ...
    def close(self) -> None: ...


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class LocalCaller:
    """The engine in this process: calls run at once."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    def submit(self, method: str, *args, **kwargs) -> Pending:
        return _Done(getattr(self.engine, method)(*args, **kwargs))

    def close(self) -> None:
        pass


class ProcessCaller:
    """The engine in a spawned child process; calls are answered in order over a pipe."""

    def __init__(self, model_dir: str, **engine_options):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_conn, model_dir,
                                                              engine_options), daemon=True)
        self._process.start()
        child_conn.close()
        self._receive()  # the engine is built (or its error raised here)

    def submit(self, method: str, *args, **kwargs) -> Pending:
        self._conn.send((method, args, kwargs))
        return self

    def result(self):
        return self._receive()

    def _receive(self):
        try:
            ok, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"engine process exited (code {self._process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"engine process failed:\n{value}")
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def _serve(conn, model_dir: str, engine_options: dict) -> None:
    try:
        engine = RolloutEngine(model_dir, **engine_options)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, None))
    while (message := conn.recv()) is not None:
        method, args, kwargs = message
        try:
            conn.send((True, getattr(engine, method)(*args, **kwargs)))
        except Exception:  # noqa: BLE001
            conn.send((False, traceback.format_exc()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessPush:
    def push(self, caller: Caller, named: NamedTensors, version: int) -> None:
        caller.submit("update_weights", named, version=version).result()

    def close(self) -> None:
        pass


class BroadcastPush:
    """WeightSender (rank 0) here, the engine (rank 1) wherever the caller runs it."""

    def __init__(self, caller: Caller, device: torch.device, port: int | None = None):
        from ..weight_sync import WeightSender
        backend = "nccl" if device.type == "cuda" else "gloo"
        port = port or free_port()
        joined = caller.submit("init_weight_sync", "127.0.0.1", port, 1, 2, backend)
        self.sender = WeightSender("127.0.0.1", port, world_size=2, backend=backend,
                                   device=device if backend == "nccl" else None,
                                   timeout_s=_TIMEOUT_S)
        joined.result()

    def push(self, caller: Caller, named: NamedTensors, version: int) -> None:
        received = caller.submit("receive_weights", _TIMEOUT_S)
        self.sender.send([(n, t.detach()) for n, t in named], version=version)
        received.result()

    def close(self) -> None:
        self.sender.close()


class IpcPush:
    """Colocated on one GPU: the engine process copies from buckets this process packed."""

    def push(self, caller: Caller, named: NamedTensors, version: int) -> None:
        from ..weight_sync import export_ipc
        export = export_ipc([(n, t.detach()) for n, t in named], version=version)
        caller.submit("update_weights_from_ipc", export.payload).result()
        del export  # the engine has copied out of the buckets

    def close(self) -> None:
        pass


class RolloutClient:
    """What the training loop sees: generate, and push new weights."""

    def __init__(self, caller: Caller, pusher):
        self.caller, self.pusher = caller, pusher

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RolloutOutput]:
        return self.caller.submit("generate_batch", prompts, params).result()

    def push(self, named: NamedTensors, version: int) -> None:
        self.pusher.push(self.caller, named, version)

    def close(self) -> None:
        self.pusher.close()
        self.caller.close()


def make_client(sync: str, model_dir: str, trainer_device: torch.device,
                caller: Caller | None = None, **engine_options) -> RolloutClient:
    """`caller` overrides where the engine runs (e.g. a Ray actor) for broadcast sync."""
    if sync not in SYNC_MODES:
        raise ValueError(f"sync: {sync!r} is not one of {', '.join(SYNC_MODES)}")
    if sync == "inprocess":
        if caller is not None:
            raise ValueError("sync: 'inprocess' runs the engine here; use 'broadcast' with a "
                             "remote engine")
        return RolloutClient(LocalCaller(RolloutEngine(model_dir, **engine_options)),
                             InProcessPush())
    if sync == "ipc" and trainer_device.type != "cuda":
        raise ValueError("sync: 'ipc' needs the trainer on a CUDA device")
    caller = caller or ProcessCaller(model_dir, **engine_options)
    if sync == "ipc":
        return RolloutClient(caller, IpcPush())
    return RolloutClient(caller, BroadcastPush(caller, trainer_device))
