"""A standalone process group for weight sync.

Its own TCPStore rendezvous and a backend built straight from that store: no
`init_process_group`, nothing registered in torch.distributed's global state, so a
trainer's default group is untouched. The trainer (rank 0) hosts the store.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import WeightSyncError, WeightSyncTimeout

BACKENDS = ("nccl", "gloo", "mori")
# NCCL's watchdog tears the process down when its own timeout fires; ours fires first
# and aborts the communicator instead, so the process survives to report the error.
_NCCL_WATCHDOG_SLACK_S = 60.0
_POLL_S = 50e-6
_LIVENESS_EVERY_S = 0.5
_ALIVE_KEY = "atom_ws/alive"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "mori":
        _require_mori()
    return backend


def _require_mori() -> None:
    from .mori_backend import require_mori_io
    require_mori_io()


def resolve_device(backend: str, device: torch.device | str | int | None) -> torch.device:
    if backend == "gloo":
        return torch.device(device if device is not None else "cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"backend={backend!r} needs a CUDA/ROCm GPU; "
                         "use backend='gloo' on CPU")
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device for backend={backend!r}, got {device}")
    return torch.device("cuda", device.index if device.index is not None
                        else torch.cuda.current_device())


def check_group_args(master_port: int, rank: int, world_size: int, timeout_s: float) -> None:
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    if world_size < 2:
        raise ValueError(f"world_size must be >= 2 (trainer + receivers), got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


class SyncGroup:
    """Broadcasts over a standalone backend; every wait honours a deadline."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 backend: str, device: torch.device, timeout_s: float) -> None:
        self.rank, self.world_size = rank, world_size
        self.backend, self.device, self.timeout_s = backend, device, timeout_s
        timeout = timedelta(seconds=timeout_s)
        try:
            self.store = dist.TCPStore(master_address, master_port, world_size,
                                       is_master=rank == 0, timeout=timeout,
                                       wait_for_workers=False)
            self._pg = self._make_backend(master_address)
            self._warm_up()
        except WeightSyncError:
            raise
        except RuntimeError as e:  # DistError and backend construction errors
            raise WeightSyncError(f"weight-sync rendezvous at {master_address}:{master_port} "
                                  f"(rank {rank}/{world_size}) failed: {e}") from e

    def _make_backend(self, master_address: str):
        if self.backend == "mori":
            from .mori_backend import MoriTransport
            return MoriTransport(dist.PrefixStore("atom_ws/mori", self.store), self.rank,
                                 self.world_size, self.device, self.timeout_s, master_address)
        store = dist.PrefixStore("atom_ws/pg", self.store)
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(store, self.rank, self.world_size,
                                         timedelta(seconds=self.timeout_s))
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=self.timeout_s + _NCCL_WATCHDOG_SLACK_S)
        opts.group_name = "atom_weight_sync"
        return dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)

    def _warm_up(self) -> None:
        # Creates the NCCL communicator now rather than inside the first timed send.
        self.barrier(time.monotonic() + self.timeout_s)

    def barrier(self, deadline: float) -> None:
        """All ranks leave together (host level): a one-byte broadcast, completed."""
        if self.backend == "mori":
            self._pg.barrier(deadline)
            return
        probe = torch.zeros(1, dtype=torch.uint8, device=self.device)
        self.finish([self.broadcast(probe, deadline)], deadline)

    def broadcast(self, tensor: torch.Tensor, deadline: float):
        """Start a broadcast from rank 0 that must end by `deadline`; returns its Work."""
        if self.backend == "mori":
            return self._pg.broadcast(tensor, deadline)
        remaining = max(deadline - time.monotonic(), 1e-3)
        if self.backend == "nccl":
            remaining += _NCCL_WATCHDOG_SLACK_S
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = timedelta(seconds=remaining)
        try:
            return self._pg.broadcast([tensor], opts)
        except RuntimeError as e:
            raise WeightSyncError(f"broadcast failed to start: {e}") from e

    def wait(self, work, deadline: float) -> None:
        """Order later work after `work`: a stream wait on CUDA (no host sync), a host
        wait with the remaining time on CPU and for MoRI (which moves bytes off-stream)."""
        if self.backend == "nccl":
            work.wait()
            return
        self._host_wait(work, deadline)

    def finish(self, works: list, deadline: float) -> None:
        """Block the host until every work is done, or raise by the deadline."""
        if self.backend == "nccl":
            if works:  # one NCCL stream: the last work completing implies the rest
                self._poll(works[-1], deadline)
            return
        for w in works:
            self._host_wait(w, deadline)

    def _host_wait(self, work, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        try:
            work.wait(timedelta(seconds=max(remaining, 1e-3)))
        except WeightSyncError:  # MoRI works raise ours already
            raise
        except RuntimeError as e:
            if time.monotonic() >= deadline or "Timed out" in str(e):
                raise WeightSyncTimeout(f"broadcast timed out: {e}") from e
            raise WeightSyncError(f"broadcast failed (peer died?): {e}") from e

    def _poll(self, work, deadline: float) -> None:
        poll_until_done(work, deadline, self._check_store)

    def _check_store(self) -> None:
        # The store lives in the trainer process: if it is gone, so is the sender, and
        # NCCL over NVLink would otherwise just spin until the deadline.
        try:
            self.store.check([_ALIVE_KEY])
        except dist.DistError as e:
            raise WeightSyncError(f"lost the trainer's store mid-update (sender died?): "
                                  f"{e}") from e

    def abort(self) -> None:
        """Tear the communicator down after a failure; pending collectives end."""
        try:
            self._pg.abort()
        except (RuntimeError, AttributeError):
            pass

    def close(self) -> None:
        if self.backend == "mori":
            self._pg.close()
            return
        try:
            self._pg.shutdown()
        except (RuntimeError, AttributeError):
            self.abort()


def poll_until_done(work, deadline: float, check_alive: Callable[[], None]) -> None:
    """Wait for a (CUDA) work without blocking inside the backend: poll its completion,
    check the peer every _LIVENESS_EVERY_S, give up at the deadline."""
    next_check = time.monotonic() + _LIVENESS_EVERY_S
    while True:
        try:
            if work.is_completed():
                work.wait()  # surfaces a recorded error, if any
                return
        except RuntimeError as e:
            raise WeightSyncError(f"broadcast failed (peer died?): {e}") from e
        now = time.monotonic()
        if now >= deadline:
            raise WeightSyncTimeout("broadcast did not complete before the deadline "
                                    "(peer died or stalled)")
        if now >= next_check:
            check_alive()
            next_check = now + _LIVENESS_EVERY_S
        time.sleep(_POLL_S)
