"""Weight-sync broadcast over AMD MoRI-IO: rank 0 writes each bucket into every receiver.

UNVERIFIED ON HARDWARE: written against MoRI's source without an AMD GPU or MoRI build;
tests/test_mori_backend.py checks the protocol and the exact MoRI calls against a fake
`mori` module only.

API mapped to: MoRI-IO as shipped in amd-mori >= 1.1.0, read at github.com/ROCm/mori
commit 624002c897a30928ec04c14fc167bf2b8a93f6ce (2026-08-21; the IO files below are
unchanged since tag v1.2.2, dafdcfcf, and only grew since v1.1.0, c4d5877a):
- python/mori/io/engine.py: IOEngine(key, IOEngineConfig), create_backend(BackendType,
  config), get_engine_desc(), register_remote_engine(EngineDesc), register_memory(ptr,
  size, device_id, MemoryLocationType), deregister_memory, deregister_remote_engine,
  allocate_transfer_uid(), write(local_src, local_off, remote_dst, remote_off, size,
  uid) -> TransferStatus.
- src/pybind/pybind_io.cpp: EngineDesc/MemoryDesc .pack() -> bytes and .unpack(bytes)
  (msgpack), TransferStatus.Succeeded()/Failed()/Message(), XgmiBackendConfig,
  RdmaBackendConfig, MemoryDesc.size.
- include/mori/io/common.hpp: TransferStatus starts INIT, is IN_PROGRESS while posted,
  then SUCCESS or an error code (> ERR_BEGIN); polling Code() drives its progress.
- src/io/engine.cpp: IOEngine::SelectBackend picks XGMI for GPU pairs in one node, then
  FABRIC, then RDMA; CreateBackend(RDMA) throws on a host without an active RDMA NIC.

Why MoRI-IO and not the other MoRI layers: mori.shmem's Python API (python/mori/shmem/
api.py) has init, symmetric malloc and barriers but no host-side put/get (puts are
device-side, from mori.ir kernels), and its init is process-wide, which would clash with
an engine's own MoRI EP state; mori.ccl's IntraNodeSubGroupBroadcastSdma (python/mori/
ccl/collective.py) is intra-node only, needs that shmem init plus MORI_ENABLE_SDMA=1,
and is newer than the last release (added 2026-07-30). MoRI-IO is the point-to-point
engine SGLang uses for PD KV transfer (sglang/srt/disaggregation/mori/conn.py).

Protocol, per broadcast (all ranks call broadcast in the same order, so a shared counter
names each one; every exchange goes through the group's own TCPStore):
  bootstrap: each rank creates an IOEngine, publishes its packed EngineDesc; rank 0
    registers every receiver's engine, each receiver registers rank 0's.
  receiver: waits for its stream (nothing may still read the buffer), registers the
    buffer once (cached while the tensor object lives), publishes its MemoryDesc, and is
    done when rank 0 publishes the broadcast's outcome.
  rank 0: waits for its stream (the bucket may still be packing), registers the source,
    fetches each receiver's MemoryDesc, posts one write per receiver, polls the statuses,
    then publishes "ok" (or the error) and deregisters the source.

Configuration: ATOM_ROLLOUT_MORI_BACKENDS (default "xgmi,rdma": MoRI routes each pair to
XGMI within a node, RDMA across nodes) and ATOM_ROLLOUT_MORI_HOST (the address a rank's
engine advertises; default: the local interface that routes to master_address).

Open questions a hardware run must answer: whether data written over RDMA/XGMI is
visible to the receiver's kernels once the sender's status reports success (no extra
flush is issued); the cost of registering the sender's bucket on every update (an RDMA
memory registration per bucket); and throughput against RCCL's broadcast.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from .errors import WeightSyncError, WeightSyncTimeout

MIN_VERSION = "1.1.0"  # first release whose EngineDesc/MemoryDesc have pack()/unpack()
ENV_BACKENDS = "ATOM_ROLLOUT_MORI_BACKENDS"  # comma list of xgmi, rdma; tried in order
ENV_HOST = "ATOM_ROLLOUT_MORI_HOST"  # address receivers' engines are reached at
DEFAULT_BACKENDS = ("xgmi", "rdma")
_REQUIRED_IO_NAMES = ("IOEngine", "IOEngineConfig", "BackendType", "EngineDesc",
                      "MemoryDesc", "MemoryLocationType", "XgmiBackendConfig",
                      "RdmaBackendConfig")
_POLL_S = 50e-6
_OK = b"ok"
_ERROR = b"error: "


# ---------------------------------------------------------------- availability

def require_mori_io() -> ModuleType:
    """`mori.io`, or an ImportError that says what is missing and what to do."""
    hint = (f"install amd-mori>={MIN_VERSION} (pip install 'atom-rollout[mori]', on a "
            "ROCm torch) or use backend='nccl' (RCCL on ROCm)")
    try:
        import mori.io as io
    except ImportError as e:
        raise ImportError(f"backend='mori' needs the 'mori' package (AMD MoRI, "
                          f"github.com/ROCm/mori) with its compiled IO engine, which does "
                          f"not import here ({e}); {hint}") from e
    missing = [n for n in _REQUIRED_IO_NAMES if not hasattr(io, n)]
    missing += [f"{n}.{a}" for n in ("EngineDesc", "MemoryDesc") if hasattr(io, n)
                for a in ("pack", "unpack") if not hasattr(getattr(io, n), a)]
    if missing:
        import mori
        raise ImportError(f"backend='mori': the 'mori' package (version "
                          f"{getattr(mori, '__version__', 'unknown')}) lacks the MoRI-IO "
                          f"API this transport uses ({', '.join(missing)}); {hint}")
    return io


# ---------------------------------------------------------------- MoRI calls
# Every call into MoRI lives in one of these functions, so the mapping can be reviewed
# (and faked) in one place.

def _new_engine(io: ModuleType, key: str, host: str) -> Any:
    # port=0: the RDMA backend binds an ephemeral control-plane port (see get_engine_desc).
    return io.IOEngine(key, io.IOEngineConfig(host=host, port=0))


def _create_backend(io: ModuleType, engine: Any, name: str) -> None:
    if name == "xgmi":
        engine.create_backend(io.BackendType.XGMI, io.XgmiBackendConfig())
    elif name == "rdma":
        engine.create_backend(io.BackendType.RDMA, io.RdmaBackendConfig())
    else:
        raise ValueError(f"{ENV_BACKENDS}: unknown MoRI-IO backend {name!r} "
                         "(use xgmi and/or rdma)")


def _pack_engine(engine: Any) -> bytes:
    return engine.get_engine_desc().pack()


def _register_peer(io: ModuleType, engine: Any, packed: bytes) -> Any:
    desc = io.EngineDesc.unpack(packed)
    engine.register_remote_engine(desc)
    return desc


def _deregister_peer(engine: Any, desc: Any) -> None:
    engine.deregister_remote_engine(desc)


def _register_tensor(io: ModuleType, engine: Any, tensor: torch.Tensor) -> Any:
    return engine.register_memory(tensor.data_ptr(), _nbytes(tensor), _device_id(tensor),
                                  io.MemoryLocationType.GPU)


def _deregister_memory(engine: Any, desc: Any) -> None:
    engine.deregister_memory(desc)


def _pack_memory(desc: Any) -> bytes:
    return desc.pack()


def _unpack_memory(io: ModuleType, packed: bytes) -> Any:
    return io.MemoryDesc.unpack(packed)


def _memory_size(desc: Any) -> int:
    return int(desc.size)


def _write(engine: Any, local: Any, remote: Any, nbytes: int) -> Any:
    """Post local[0:nbytes] -> remote[0:nbytes]; returns its TransferStatus."""
    return engine.write(local, 0, remote, 0, nbytes, engine.allocate_transfer_uid())


def _status(status: Any) -> tuple[bool, str | None]:
    """(finished, error message or None) of a TransferStatus, without blocking."""
    if status.Succeeded():
        return True, None
    if status.Failed():
        return True, status.Message() or "MoRI-IO transfer failed"
    return False, None


# ---------------------------------------------------------------- helpers

def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _device_id(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else -1


def _device_scope(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _settle_stream(tensor: torch.Tensor) -> None:
    # MoRI-IO moves bytes outside any torch stream: on the sender the bucket may still be
    # packing, on a receiver the previous update's views may still be read.
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()


def backend_names() -> list[str]:
    raw = os.environ.get(ENV_BACKENDS, "")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return names or list(DEFAULT_BACKENDS)


def local_host(master_address: str) -> str:
    """The address of the interface that routes to the trainer (no packet is sent)."""
    if os.environ.get(ENV_HOST):
        return os.environ[ENV_HOST]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_address, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _remaining(deadline: float) -> timedelta:
    return timedelta(seconds=max(deadline - time.monotonic(), 1e-3))


def _store_wait(store: dist.Store, keys: list[str], deadline: float, what: str) -> None:
    try:
        store.wait(keys, _remaining(deadline))
    except dist.DistStoreError as e:
        raise WeightSyncTimeout(f"{what} did not arrive before the deadline: {e}") from e
    except dist.DistError as e:
        raise WeightSyncError(f"lost the trainer's store waiting for {what} "
                              f"(peer died?): {e}") from e


class _DoneWork:
    """A zero-byte broadcast: nothing moves, nothing to wait for."""

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout: timedelta | None = None) -> bool:
        return True


# ---------------------------------------------------------------- transport

@dataclass
class _Registered:
    ref: weakref.ref
    desc: Any


class MoriTransport:
    """SyncGroup's backend for backend='mori': broadcast / barrier / abort / close."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, master_address: str) -> None:
        self.io = require_mori_io()
        self.store, self.rank, self.world_size = store, rank, world_size
        self.device, self.timeout_s = device, timeout_s
        self._seq = 0
        self._barriers = 0
        self._peers: list[Any] = []
        self._registered: dict[tuple[int, int], _Registered] = {}
        self._pending: dict[int, _SenderWork] = {}
        self._in_flight: list[_SenderWork] = []  # failed with writes still posted
        self._broken = False
        with _device_scope(device):
            self.engine = _new_engine(self.io, self._engine_key(), local_host(master_address))
            self.backend_errors = self._create_backends()
        self._exchange_engines(time.monotonic() + timeout_s)

    def _engine_key(self) -> str:
        return f"atom_ws-r{self.rank}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _create_backends(self) -> dict[str, str]:
        """Create each configured backend; one that fails is skipped if another works
        (an XGMI-only host has no RDMA NIC), and named in later transfer errors."""
        errors: dict[str, str] = {}
        names = backend_names()
        for name in names:
            try:
                _create_backend(self.io, self.engine, name)
            except RuntimeError as e:
                errors[name] = str(e)
        if len(errors) == len(names):
            raise WeightSyncError("MoRI-IO: no backend could be created: " + "; ".join(
                f"{n}: {msg}" for n, msg in errors.items()))
        return errors

    def _exchange_engines(self, deadline: float) -> None:
        self.store.set(f"engine/{self.rank}", _pack_engine(self.engine))
        peers = range(1, self.world_size) if self.rank == 0 else [0]
        keys = [f"engine/{r}" for r in peers]
        _store_wait(self.store, keys, deadline, "the peers' MoRI-IO engine descriptors")
        self._peers = [_register_peer(self.io, self.engine, self.store.get(k)) for k in keys]

    # -------------------------------------------------------- broadcast

    def broadcast(self, tensor: torch.Tensor, deadline: float):
        """Start broadcast number `seq` of `tensor` (a flat contiguous buffer) from rank 0;
        returns a work with is_completed() / wait(timeout)."""
        if self._broken:
            raise WeightSyncError("MoRI-IO transport was aborted after an earlier failure")
        seq, self._seq = self._seq, self._seq + 1
        if _nbytes(tensor) == 0:
            return _DoneWork()
        _settle_stream(tensor)
        if self.rank == 0:
            return self._send(seq, tensor, deadline)
        return self._post_receive(seq, tensor)

    def _send(self, seq: int, tensor: torch.Tensor, deadline: float) -> _SenderWork:
        work = _SenderWork(self, seq, tensor)
        try:
            work.local = _register_tensor(self.io, self.engine, tensor)
            for r in range(1, self.world_size):
                remote = self._fetch_destination(seq, r, _nbytes(tensor), deadline)
                work.statuses.append(_write(self.engine, work.local, remote, _nbytes(tensor)))
        except Exception as e:
            work.settle(f"could not start: {e}")
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"MoRI-IO broadcast {seq} failed to start: {e}"
                                  f"{self._backend_note()}") from e
        self._pending[seq] = work
        return work

    def _fetch_destination(self, seq: int, rank: int, nbytes: int, deadline: float) -> Any:
        key = f"{seq}/dst/{rank}"
        _store_wait(self.store, [key], deadline, f"receiver {rank}'s buffer for broadcast {seq}")
        remote = _unpack_memory(self.io, self.store.get(key))
        self.store.delete_key(key)
        if _memory_size(remote) < nbytes:
            raise WeightSyncError(f"receiver {rank} posted {_memory_size(remote)} bytes for "
                                  f"broadcast {seq} of {nbytes} bytes (layouts disagree)")
        return remote

    def _post_receive(self, seq: int, tensor: torch.Tensor) -> _ReceiverWork:
        desc = self._registration(tensor)
        self.store.set(f"{seq}/dst/{self.rank}", _pack_memory(desc))
        return _ReceiverWork(self.store, seq, self.world_size - 1)

    def _registration(self, tensor: torch.Tensor) -> Any:
        """Receivers reuse their bucket buffers every update: register each once, for as
        long as the tensor object lives (a live tensor cannot have been freed)."""
        self._drop_dead_registrations()
        key = (tensor.data_ptr(), _nbytes(tensor))
        entry = self._registered.get(key)
        if entry is not None and entry.ref() is tensor:
            return entry.desc
        if entry is not None:
            _deregister_memory(self.engine, entry.desc)
        desc = _register_tensor(self.io, self.engine, tensor)
        self._registered[key] = _Registered(weakref.ref(tensor), desc)
        return desc

    def _drop_dead_registrations(self) -> None:
        for key in [k for k, e in self._registered.items() if e.ref() is None]:
            _deregister_memory(self.engine, self._registered.pop(key).desc)

    def _backend_note(self) -> str:
        if not self.backend_errors:
            return ""
        return " (MoRI-IO backends that could not be created: " + "; ".join(
            f"{n}: {msg}" for n, msg in self.backend_errors.items()) + ")"

    # -------------------------------------------------------- barrier / teardown

    def barrier(self, deadline: float) -> None:
        """Host-level: every rank has arrived (through the store, no GPU memory)."""
        key, self._barriers = f"barrier/{self._barriers}", self._barriers + 1
        if self.store.add(key, 1) == self.world_size:
            self.store.set(key + "/all", _OK)
        _store_wait(self.store, [key + "/all"], deadline, "every rank at the barrier")

    def abort(self) -> None:
        """MoRI-IO cannot cancel posted writes. The sender tells the receivers of every
        pending broadcast that it failed; a receiver deregisters its buffers, so a late
        write fails rather than landing in memory the caller is about to free."""
        self._broken = True
        for work in list(self._pending.values()):
            work.settle("aborted by the sender")
        for entry in self._registered.values():
            _safe(_deregister_memory, self.engine, entry.desc)
        self._registered.clear()

    def close(self) -> None:
        self.abort()
        for work in self._in_flight:
            _safe(_deregister_memory, self.engine, work.local)
        self._in_flight = []
        for peer in self._peers:
            _safe(_deregister_peer, self.engine, peer)
        self._peers = []


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError:
        pass


@dataclass
class _SenderWork:
    transport: MoriTransport
    seq: int
    tensor: torch.Tensor  # kept alive while writes read it
    local: Any = None
    statuses: list = field(default_factory=list)
    error: str | None = None
    settled: bool = False

    def is_completed(self) -> bool:
        """Poll the writes; on the last one publish the outcome to the receivers."""
        if not self.settled:
            states = [_status(s) for s in self.statuses]
            errors = [msg for _, msg in states if msg]
            if errors:
                self.settle(errors[0])
            elif all(done for done, _ in states):
                self.settle(None)
        if self.error is not None:
            raise WeightSyncError(f"MoRI-IO broadcast {self.seq} failed: {self.error}"
                                  f"{self.transport._backend_note()}")
        return self.settled

    def wait(self, timeout: timedelta | None = None) -> bool:
        limit = None if timeout is None else time.monotonic() + timeout.total_seconds()
        while not self.is_completed():
            if limit is not None and time.monotonic() >= limit:
                raise WeightSyncTimeout(f"MoRI-IO broadcast {self.seq}: writes still in "
                                        "flight at the deadline (receiver died or stalled?)")
            time.sleep(_POLL_S)
        return True

    def settle(self, error: str | None) -> None:
        """Publish the outcome once; release the source unless a write may still read it."""
        if self.settled:
            return
        self.settled, self.error = True, error
        transport = self.transport
        outcome = _OK if error is None else _ERROR + error.encode()
        _safe(transport.store.set, f"{self.seq}/done", outcome)
        transport._pending.pop(self.seq, None)
        if self.local is None:
            return
        if any(not _status(s)[0] for s in self.statuses):
            transport._in_flight.append(self)
        else:
            _safe(_deregister_memory, transport.engine, self.local)


@dataclass
class _ReceiverWork:
    store: dist.Store
    seq: int
    num_receivers: int
    outcome: bytes | None = None

    def is_completed(self) -> bool:
        if self.outcome is None:
            try:
                if not self.store.check([f"{self.seq}/done"]):
                    return False
            except dist.DistError as e:
                raise WeightSyncError(f"lost the trainer's store during MoRI-IO broadcast "
                                      f"{self.seq} (sender died?): {e}") from e
            self._take_outcome()
        return self._result()

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self.outcome is None:
            limit = timeout.total_seconds() if timeout is not None else 1e9
            _store_wait(self.store, [f"{self.seq}/done"], time.monotonic() + limit,
                        f"the sender's outcome of MoRI-IO broadcast {self.seq}")
            self._take_outcome()
        return self._result()

    def _take_outcome(self) -> None:
        key = f"{self.seq}/done"
        self.outcome = self.store.get(key)
        # The last receiver to read the outcome deletes it (cf. acknowledge_header).
        if self.store.add(key + "/acks", 1) == self.num_receivers:
            self.store.delete_key(key)
            self.store.delete_key(key + "/acks")

    def _result(self) -> bool:
        if self.outcome != _OK:
            raise WeightSyncError(f"MoRI-IO broadcast {self.seq} failed on the sender: "
                                  f"{self.outcome.removeprefix(_ERROR).decode(errors='replace')}")
        return True
