"""CoreClient: starts the engine core process and talks to it over pyzmq.

A receiver thread reads the output channel and hands deltas to per-request sinks and
replies to per-call futures. When the core process dies (crash, kill, fatal error) every
pending sink and future fails with EngineDeadError within about POLL_MS, and so does
every later call. The process is stopped by close(), by garbage collection of the
client, or at interpreter exit; the core also exits by itself if its parent dies.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Protocol

import zmq

from .config import EngineConfig
from .core_process import run_core_process
from .protocol import CoreAddresses, CoreInfo, EngineDeadError, SampleDelta

POLL_MS = 100


class Sink(Protocol):
    """Where one request's deltas go; called from the receiver thread."""

    def push(self, deltas: list[SampleDelta]) -> bool:
        """Take deltas; True once the request has ended (the sink is then dropped)."""

    def fail(self, error: BaseException) -> None: ...


class CoreClient:
    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0):
        self._conn = _Connection(config, startup_timeout_s)
        self._finalizer = weakref.finalize(self, self._conn.close)

    @property
    def info(self) -> CoreInfo:
        return self._conn.info

    @property
    def process(self) -> multiprocessing.Process:
        return self._conn.process

    @property
    def error(self) -> EngineDeadError | None:
        return self._conn.error

    def add_request(self, request_id: str, message: tuple, sink: Sink) -> None:
        """Register the sink, then send ("add"|"score", request_id, ...)."""
        self._conn.register(request_id, sink)
        self._conn.send(self._conn.input, message)

    def abort(self, request_ids: list[str]) -> None:
        self._conn.send(self._conn.input, ("abort", list(request_ids)))

    def call(self, method: str, *args, **kwargs) -> Future:
        """A utility call run by the core loop between two steps."""
        return self._conn.call(method, args, kwargs)

    def close(self) -> None:
        self._finalizer()


class _Connection:
    """Everything the receiver thread and the finalizer need (never the CoreClient itself,
    so that dropping the client garbage-collects it)."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float):
        self.directory = tempfile.mkdtemp(prefix="atom-rollout-core-")
        addresses = CoreAddresses.in_dir(self.directory)
        self.context = zmq.Context()
        self.input = self._bind(zmq.PUSH, addresses.input)
        self.control = self._bind(zmq.PUSH, addresses.control)
        self.output = self._bind(zmq.PULL, addresses.output)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_core_process, args=(config, addresses, os.getpid()),
            name="atom-rollout-core", daemon=True)
        self.lock = threading.Lock()  # guards sockets we send on, sinks, calls, error
        self.sinks: dict[str, Sink] = {}
        self.calls: dict[int, Future] = {}
        self.call_ids = itertools.count()
        self.error: EngineDeadError | None = None
        self.closing = threading.Event()
        self.process.start()
        try:
            self.info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self.thread = threading.Thread(target=self._receive_loop, name="atom-rollout-receiver",
                                       daemon=True)
        self.thread.start()

    def _bind(self, kind: int, address: str) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.bind(address)
        return socket

    def _wait_ready(self, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.output.poll(POLL_MS):
                kind, payload = self.output.recv_pyobj()
                if kind == "ready":
                    return payload
                raise EngineDeadError(f"engine core failed to start:\n{payload}")
            if not self.process.is_alive():
                raise EngineDeadError(f"engine core process exited during start-up "
                                      f"(exit code {self.process.exitcode})")
        raise EngineDeadError(f"engine core not ready after {timeout_s:.0f} s")

    # ---- sending (any thread)

    def register(self, request_id: str, sink: Sink) -> None:
        with self.lock:
            self._check_alive()
            if request_id in self.sinks:
                raise ValueError(f"request_id: {request_id!r} is already running")
            self.sinks[request_id] = sink

    def send(self, socket: zmq.Socket, message) -> None:
        with self.lock:
            self._check_alive()
            socket.send_pyobj(message)

    def call(self, method: str, args: tuple, kwargs: dict) -> Future:
        future: Future = Future()
        with self.lock:
            self._check_alive()
            call_id = next(self.call_ids)
            self.calls[call_id] = future
            self.control.send_pyobj((call_id, method, args, kwargs))
        return future

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- receiving (the receiver thread)

    def _receive_loop(self) -> None:
        while not self.closing.is_set():
            if self.output.poll(POLL_MS):
                self._dispatch(self.output.recv_pyobj())
            elif not self.process.is_alive():
                self.fail(f"engine core process died (exit code {self.process.exitcode})")
            if self.error is not None:
                return

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "deltas":
            self._deliver(message[1])
        elif kind == "reply":
            _, call_id, ok, value = message
            with self.lock:
                future = self.calls.pop(call_id, None)
            if future is not None and ok:
                future.set_result(value)
            elif future is not None:
                future.set_exception(value)
        elif kind == "fatal":
            self.fail(f"engine core process failed:\n{message[1]}")

    def _deliver(self, deltas: list[SampleDelta]) -> None:
        by_request: dict[str, list[SampleDelta]] = {}
        for delta in deltas:
            by_request.setdefault(delta.request_id, []).append(delta)
        for request_id, group in by_request.items():
            sink = self.sinks.get(request_id)
            if sink is not None and sink.push(group):
                with self.lock:
                    self.sinks.pop(request_id, None)

    def fail(self, reason: str) -> None:
        """Mark the engine dead and fail everything pending."""
        with self.lock:
            if self.error is None:
                self.error = EngineDeadError(reason)
            sinks, self.sinks = self.sinks, {}
            calls, self.calls = self.calls, {}
        for sink in sinks.values():
            sink.fail(self.error)
        for future in calls.values():
            future.set_exception(self.error)

    # ---- shutdown (finalizer; idempotent)

    def close(self) -> None:
        if self.closing.is_set():
            return
        self.closing.set()
        if self.process.is_alive() and self.error is None and hasattr(self, "info"):
            try:
                self.control.send_pyobj((-1, "shutdown", (), {}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        _stop_process(self.process)
        thread = getattr(self, "thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * POLL_MS / 1000)
        self.fail("engine was shut down")
        self.context.destroy(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)


def _stop_process(process: multiprocessing.Process, grace_s: float = 5.0) -> None:
    process.join(timeout=grace_s)
    if process.is_alive():
        process.terminate()
        process.join(timeout=grace_s)
    if process.is_alive():
        process.kill()
        process.join()
