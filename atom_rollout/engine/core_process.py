"""The EngineCore loop in its own process: intake -> step -> stream outputs, over pyzmq.

Started by `CoreClient` (multiprocessing spawn). Between two steps the loop drains the
control channel (utility calls: weight updates, pause/resume, abort, stats; any other
public EngineCore method by name) and the input channel (add, score, abort).
"""
from __future__ import annotations

import os
import signal
import traceback
from collections import deque

import zmq

from .config import EngineConfig
from .core import EngineCore
from .output_tracker import OutputTracker
from .protocol import CoreAddresses, CoreInfo, SampleDelta

PAUSE_MODES = ("abort", "wait", "keep")
IDLE_POLL_MS = 200  # how often an idle core checks that its parent is still alive


def run_core_process(config: EngineConfig, addresses: CoreAddresses, parent_pid: int) -> None:
    """Process entry point: build the engine, then serve until shutdown or parent exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end owns Ctrl-C and shuts us down
    context = zmq.Context()
    output = context.socket(zmq.PUSH)
    output.connect(addresses.output)
    try:
        core = EngineCore(config)
        loop = CoreLoop(core, context, addresses, output, parent_pid)
        output.send_pyobj(("ready", CoreInfo(core.max_model_len, core.vocab_size,
                                             frozenset(core.eos_token_ids),
                                             core.weight_version, os.getpid())))
        loop.run()
    except BaseException:
        output.send_pyobj(("fatal", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        context.destroy(linger=1000)


class CoreLoop:
    def __init__(self, core: EngineCore, context: zmq.Context, addresses: CoreAddresses,
                 output: zmq.Socket, parent_pid: int):
        self.core = core
        self.output = output
        self.parent_pid = parent_pid
        self.input = context.socket(zmq.PULL)
        self.input.connect(addresses.input)
        self.control = context.socket(zmq.PULL)
        self.control.connect(addresses.control)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.input, zmq.POLLIN)
        self.tracker = OutputTracker()
        self.paused: str | None = None
        self.held: deque[tuple] = deque()  # requests that arrived while paused
        self.drain_waiters: list[int] = []  # pause("wait") calls answered once drained
        self.running = True

    def run(self) -> None:
        while self.running and os.getppid() == self.parent_pid:
            stepping = self.core.has_work() and self.paused != "keep"
            self._drain_sockets(0 if stepping else IDLE_POLL_MS)
            if stepping and self.core.has_work() and self.paused != "keep":
                self.core.step()
            self._emit()

    def _drain_sockets(self, timeout_ms: int) -> None:
        ready = dict(self.poller.poll(timeout_ms))
        while ready:
            if self.control in ready:
                self._handle_call(*self.control.recv_pyobj())
            if self.input in ready:
                self._handle_input(self.input.recv_pyobj())
            ready = dict(self.poller.poll(0))

    def _emit(self) -> None:
        deltas = self.tracker.collect(self.core.weight_version)
        if deltas:
            self.output.send_pyobj(("deltas", deltas))
        if self.drain_waiters and not len(self.tracker):
            for call_id in self.drain_waiters:
                self._reply(call_id, True, None)
            self.drain_waiters = []

    # ---- input channel

    def _handle_input(self, message: tuple) -> None:
        kind = message[0]
        if kind == "abort":
            self.abort(message[1])
        elif self.paused is not None:
            self.held.append(message)
        else:
            self._admit(message)

    def _admit(self, message: tuple) -> None:
        kind, request_id, *args = message
        try:
            if kind == "add":
                prompt_ids, params, stream = args
                self.tracker.add(request_id, self.core.add_request(request_id, prompt_ids,
                                                                   params), stream)
            else:
                self.tracker.add(request_id, [self.core.add_score(request_id, *args)], False)
        except Exception:  # the front end validated; this is a bug, so end only this request
            traceback.print_exc()
            self.output.send_pyobj(("deltas", _aborted(message)))

    # ---- control channel

    def _handle_call(self, call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            if method == "pause" and kwargs.get("mode", args[0] if args else "abort") == "wait":
                self.pause("wait")
                if len(self.tracker):
                    self.drain_waiters.append(call_id)  # answered by _emit once drained
                    return
                value = None
            else:
                value = self._call(method, args, kwargs)
        except Exception as e:
            self._reply(call_id, False, e)
        else:
            self._reply(call_id, True, value)

    def _call(self, method: str, args: tuple, kwargs: dict):
        if method in ("pause", "resume", "abort", "stats", "shutdown"):
            return getattr(self, method)(*args, **kwargs)
        if method.startswith("_") or not hasattr(self.core, method):
            raise AttributeError(f"method: the engine core has no public method {method!r}")
        target = getattr(self.core, method)
        return target(*args, **kwargs) if callable(target) else target

    def _reply(self, call_id: int, ok: bool, value) -> None:
        try:
            self.output.send_pyobj(("reply", call_id, ok, value))
        except Exception as e:  # an unpicklable value or exception
            self.output.send_pyobj(("reply", call_id, False,
                                    RuntimeError(f"{type(value).__name__}: {value} ({e})")))

    # ---- utility calls handled by the loop itself

    def pause(self, mode: str = "abort") -> None:
        """abort: end in-flight requests now; wait: let them finish; keep: freeze them.
        In every mode new requests are held until resume()."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {PAUSE_MODES}")
        self.paused = mode
        if mode == "abort":
            self.core.abort(self.tracker.seqs())

    def resume(self) -> None:
        self.paused = None
        for call_id in self.drain_waiters:
            self._reply(call_id, True, None)
        self.drain_waiters = []
        while self.held:
            self._admit(self.held.popleft())

    def abort(self, request_ids) -> None:
        request_ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.core.abort(self.tracker.seqs(request_ids))
        wanted = set(request_ids)
        dropped = [m for m in self.held if m[1] in wanted]
        for message in dropped:
            self.held.remove(message)
            self.output.send_pyobj(("deltas", _aborted(message)))

    def stats(self) -> dict:
        return {**self.core.stats(), "paused": self.paused, "num_requests": len(self.tracker),
                "num_held_requests": len(self.held), "pid": os.getpid()}

    def shutdown(self) -> None:
        self.running = False


def _aborted(message: tuple) -> list[SampleDelta]:
    """Final deltas for a request that never reached the engine."""
    kind, request_id = message[0], message[1]
    num_samples = message[3].n if kind == "add" else 1
    return [SampleDelta(request_id, j, [], [], finish_reason="abort")
            for j in range(num_samples)]
