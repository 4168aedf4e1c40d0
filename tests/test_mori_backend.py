"""The MoRI weight-sync transport without AMD hardware: backend selection, bootstrap
arguments and the MoRI-IO call sequence of a broadcast, against a fake `mori` package
whose IOEngine copies host memory between CPU tensors. Nothing here runs real MoRI."""
from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from atom_rollout.weight_sync import WeightSyncError, WeightSyncTimeout
from atom_rollout.weight_sync import mori_backend
from atom_rollout.weight_sync.mori_backend import MoriTransport
from atom_rollout.weight_sync.process_group import SyncGroup, check_backend

CPU = torch.device("cpu")


# ---------------------------------------------------------------- fake mori.io
# Shapes follow ROCm/mori python/mori/io/engine.py and src/pybind/pybind_io.cpp.

@dataclass
class Call:
    engine: str
    name: str
    args: tuple


@dataclass
class Hub:
    """What every fake engine of one test shares: registered memory and a call log."""
    calls: list[Call] = field(default_factory=list)
    memory: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    fail_backends: set[str] = field(default_factory=set)
    write_mode: str = "copy"  # copy | fail | hang
    lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, engine: str, name: str, *args) -> None:
        with self.lock:
            self.calls.append(Call(engine, name, args))

    def named(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]


@dataclass(frozen=True)
class EngineDesc:
    key: str
    host: str
    port: int

    def pack(self) -> bytes:
        return json.dumps([self.key, self.host, self.port]).encode()

    @staticmethod
    def unpack(raw: bytes) -> EngineDesc:
        return EngineDesc(*json.loads(raw))


@dataclass(frozen=True)
class MemoryDesc:
    engine_key: str
    id: int
    data: int
    size: int
    device_id: int

    def pack(self) -> bytes:
        return json.dumps([self.engine_key, self.id, self.data, self.size,
                           self.device_id]).encode()

    @staticmethod
    def unpack(raw: bytes) -> MemoryDesc:
        return MemoryDesc(*json.loads(raw))


class TransferStatus:
    def __init__(self, code: str, message: str = "") -> None:
        self.code, self.message = code, message

    def Succeeded(self) -> bool:
        return self.code == "SUCCESS"

    def Failed(self) -> bool:
        return self.code == "ERR"

    def Message(self) -> str:
        return self.message


def make_fake_mori(hub: Hub) -> dict[str, ModuleType]:
    io = ModuleType("mori.io")
    io.BackendType = SimpleNamespace(XGMI="XGMI", RDMA="RDMA")
    io.MemoryLocationType = SimpleNamespace(GPU="GPU", CPU="CPU")
    io.EngineDesc, io.MemoryDesc = EngineDesc, MemoryDesc

    class IOEngineConfig:
        def __init__(self, host: str = "", port: int = 0) -> None:
            self.host, self.port = host, port

    class XgmiBackendConfig:
        pass

    class RdmaBackendConfig:
        pass

    class IOEngine:
        def __init__(self, key: str, config: IOEngineConfig) -> None:
            self.key, self.config = key, config
            self.peers: set[str] = set()
            self.next_mem = self.next_uid = 0
            hub.log(key, "IOEngine", key, config.host, config.port)

        def create_backend(self, kind, config) -> None:
            hub.log(self.key, "create_backend", kind, type(config).__name__)
            if kind in hub.fail_backends:
                raise RuntimeError(f"no active {kind} device on this host")

        def get_engine_desc(self) -> EngineDesc:
            return EngineDesc(self.key, self.config.host, 4242)

        def register_remote_engine(self, desc: EngineDesc) -> None:
            hub.log(self.key, "register_remote_engine", desc.key)
            self.peers.add(desc.key)

        def deregister_remote_engine(self, desc: EngineDesc) -> None:
            hub.log(self.key, "deregister_remote_engine", desc.key)
            self.peers.discard(desc.key)

        def register_memory(self, ptr: int, size: int, device: int, loc) -> MemoryDesc:
            hub.log(self.key, "register_memory", ptr, size, device, loc)
            desc = MemoryDesc(self.key, self.next_mem, ptr, size, device)
            self.next_mem += 1
            with hub.lock:
                hub.memory[(self.key, desc.id)] = (ptr, size)
            return desc

        def deregister_memory(self, desc: MemoryDesc) -> None:
            hub.log(self.key, "deregister_memory", desc.id)
            with hub.lock:
                hub.memory.pop((self.key, desc.id))

        def allocate_transfer_uid(self) -> int:
            self.next_uid += 1
            return self.next_uid

        def write(self, local, local_off, remote, remote_off, size, uid) -> TransferStatus:
            hub.log(self.key, "write", local.id, local_off, remote.engine_key, remote.id,
                    remote_off, size, uid)
            if remote.engine_key not in self.peers:
                return TransferStatus("ERR", "remote engine not registered")
            if (remote.engine_key, remote.id) not in hub.memory:
                return TransferStatus("ERR", "remote memory not registered")
            if hub.write_mode == "fail":
                return TransferStatus("ERR", "RDMA write error: retry exceeded")
            if hub.write_mode == "hang":
                return TransferStatus("IN_PROGRESS")
            ctypes.memmove(remote.data + remote_off, local.data + local_off, size)
            return TransferStatus("SUCCESS")

    for obj in (IOEngineConfig, XgmiBackendConfig, RdmaBackendConfig, IOEngine):
        setattr(io, obj.__name__, obj)
    mori = ModuleType("mori")
    mori.__version__ = "1.2.2"
    mori.io = io
    return {"mori": mori, "mori.io": io}


@pytest.fixture
def hub(monkeypatch) -> Hub:
    hub = Hub()
    for name, module in make_fake_mori(hub).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(mori_backend.ENV_BACKENDS, raising=False)
    monkeypatch.setenv(mori_backend.ENV_HOST, "10.0.0.7")
    return hub


def run_ranks(*fns):
    """Run one callable per rank in threads; return their results, re-raising errors."""
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def transports(world_size: int, timeout_s: float = 5.0) -> list[MoriTransport]:
    store = dist.HashStore()
    return run_ranks(*[
        (lambda r=r: MoriTransport(dist.PrefixStore("atom_ws/mori", store), r, world_size,
                                   CPU, timeout_s, "127.0.0.1"))
        for r in range(world_size)])


def deadline(s: float = 5.0) -> float:
    return time.monotonic() + s


# ---------------------------------------------------------------- selection

def test_missing_mori_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mori", None)
    monkeypatch.setitem(sys.modules, "mori.io", None)
    with pytest.raises(ImportError, match=r"'mori' package.*amd-mori>=1\.1\.0.*'nccl'"):
        check_backend("mori")


def test_mori_without_the_io_api_names_what_is_missing(hub, monkeypatch):
    del sys.modules["mori.io"].IOEngine
    monkeypatch.delattr(EngineDesc, "pack")
    with pytest.raises(ImportError, match=r"version 1\.2\.2.*IOEngine, EngineDesc\.pack"):
        check_backend("mori")


def test_mori_selected_when_it_imports(hub):
    assert check_backend("mori") == "mori"


def test_sync_group_uses_the_mori_transport_on_its_own_store(hub, monkeypatch):
    port = _free_port()
    groups = run_ranks(*[
        (lambda r=r: SyncGroup("127.0.0.1", port, r, 2, "mori", CPU, 5.0)) for r in (0, 1)])
    assert all(isinstance(g._pg, MoriTransport) for g in groups)
    assert not dist.is_initialized()  # the default group was never touched
    sender, receiver = groups
    src = torch.arange(10, dtype=torch.uint8)
    dst = torch.zeros(10, dtype=torch.uint8)
    works = run_ranks(lambda: sender.broadcast(src, deadline()),
                      lambda: receiver.broadcast(dst, deadline()))
    run_ranks(lambda: sender.finish([works[0]], deadline()),
              lambda: receiver.finish([works[1]], deadline()))
    assert torch.equal(src, dst)
    run_ranks(lambda: sender.barrier(deadline()), lambda: receiver.barrier(deadline()))
    receiver.close()
    sender.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_arguments(hub):
    ts = transports(3)
    engines = [c for c in hub.calls if c.name == "IOEngine"]
    assert len(engines) == 3
    for rank, t in enumerate(ts):
        key = t.engine.key
        assert key.startswith(f"atom_ws-r{rank}-")
        assert (t.engine.config.host, t.engine.config.port) == ("10.0.0.7", 0)
        backends = [c.args for c in hub.calls if c.engine == key and c.name == "create_backend"]
        assert backends == [("XGMI", "XgmiBackendConfig"), ("RDMA", "RdmaBackendConfig")]
        peers = sorted(c.args[0] for c in hub.calls
                       if c.engine == key and c.name == "register_remote_engine")
        expected = [o.engine.key for o in ts[1:]] if rank == 0 else [ts[0].engine.key]
        assert peers == sorted(expected)
    assert not dist.is_initialized()


def test_backends_follow_the_env_and_a_missing_nic_is_tolerated(hub, monkeypatch):
    hub.fail_backends = {"RDMA"}
    ts = transports(2)
    assert set(ts[0].backend_errors) == {"rdma"}
    monkeypatch.setenv(mori_backend.ENV_BACKENDS, "rdma")
    with pytest.raises(WeightSyncError, match="no backend could be created.*rdma: no active"):
        MoriTransport(dist.HashStore(), 0, 2, CPU, 1.0, "127.0.0.1")


def test_local_host_is_the_interface_towards_the_trainer(monkeypatch):
    monkeypatch.delenv(mori_backend.ENV_HOST, raising=False)
    assert mori_backend.local_host("127.0.0.1") == "127.0.0.1"


# ---------------------------------------------------------------- broadcast

def broadcast_all(ts: list[MoriTransport], tensors: list[torch.Tensor]) -> None:
    works = run_ranks(*[(lambda t=t, x=x: t.broadcast(x, deadline()))
                        for t, x in zip(ts, tensors)])
    run_ranks(*[(lambda w=w: w.wait()) for w in works])


def test_broadcast_call_sequence(hub):
    ts = transports(3)
    sender, receivers = ts[0], ts[1:]
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    bufs = [torch.zeros(4096, dtype=torch.uint8) for _ in receivers]
    hub.calls.clear()
    broadcast_all(ts, [src, *bufs])
    assert all(torch.equal(src, b) for b in bufs)

    by = {t.engine.key: [c for c in hub.calls if c.engine == t.engine.key] for t in ts}
    names = [c.name for c in by[sender.engine.key]]
    assert names == ["register_memory", "write", "write", "deregister_memory"]
    reg = by[sender.engine.key][0]
    assert reg.args == (src.data_ptr(), 4096, -1, "GPU")
    writes = hub.named("write")
    assert {w.args[2] for w in writes} == {r.engine.key for r in receivers}
    assert all(w.args[1] == 0 and w.args[4] == 0 and w.args[5] == 4096 for w in writes)
    assert len({w.args[6] for w in writes}) == 2  # one transfer uid per write
    for r, buf in zip(receivers, bufs):
        assert [c.args for c in by[r.engine.key]] == [(buf.data_ptr(), 4096, -1, "GPU")]

    # Second update into the same buffers: receivers reuse their registrations.
    hub.calls.clear()
    src2 = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    broadcast_all(ts, [src2, *bufs])
    assert all(torch.equal(src2, b) for b in bufs)
    assert [c.engine for c in hub.named("register_memory")] == [sender.engine.key]
    assert sorted(k[0] for k in hub.memory) == sorted(r.engine.key for r in receivers)
    # Store keys of finished broadcasts are cleaned up.
    for seq in (0, 1):
        assert not sender.store.check([f"{seq}/done"])
        assert not sender.store.check([f"{seq}/dst/1"])


def test_receiver_reregisters_a_new_buffer(hub):
    ts = transports(2)
    broadcast_all(ts, [torch.ones(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)])
    hub.calls.clear()
    buf = torch.zeros(128, dtype=torch.uint8)  # the layout changed: a new buffer
    broadcast_all(ts, [torch.full((128,), 7, dtype=torch.uint8), buf])
    assert torch.equal(buf, torch.full((128,), 7, dtype=torch.uint8))
    receiver_calls = [c.name for c in hub.calls if c.engine == ts[1].engine.key]
    assert receiver_calls == ["deregister_memory", "register_memory"]  # old one swept


def test_zero_byte_broadcast_moves_nothing(hub):
    ts = transports(2)
    hub.calls.clear()
    works = [t.broadcast(torch.zeros(0, dtype=torch.uint8), deadline()) for t in ts]
    assert all(w.is_completed() and w.wait() for w in works)
    assert hub.calls == []


def test_full_update_over_fake_mori(hub, monkeypatch):
    from atom_rollout.weight_sync import WeightReceiver, WeightSender, receiver, sender
    monkeypatch.setattr(sender, "resolve_device", lambda backend, device: CPU)
    monkeypatch.setattr(receiver, "resolve_device", lambda backend, device: CPU)
    from test_weight_sync_transport import digest, make_update
    port = _free_port()
    s, r = run_ranks(
        lambda: WeightSender("127.0.0.1", port, 2, backend="mori", bucket_bytes=64 * 1024,
                             timeout_s=10),
        lambda: WeightReceiver("127.0.0.1", port, 1, 2, backend="mori", timeout_s=10))
    for seed in (1, 2):
        stats, update = run_ranks(lambda: s.send(make_update(seed), version=seed),
                                  lambda: r.receive())
        assert update.version == seed and stats.num_buckets == update.num_buckets > 1
        assert digest(update.named_tensors) == digest(make_update(seed))
    r.close()
    s.close()


# ---------------------------------------------------------------- failures

def test_layout_mismatch_fails_the_sender_and_tells_the_receiver(hub):
    ts = transports(2)
    works = run_ranks(lambda: ts[1].broadcast(torch.zeros(8, dtype=torch.uint8), deadline()),
                      lambda: _raises(lambda: ts[0].broadcast(torch.ones(16, dtype=torch.uint8),
                                                              deadline())))
    assert "layouts disagree" in str(works[1])
    with pytest.raises(WeightSyncError, match="failed on the sender.*could not start"):
        works[0].wait()
    assert not any(k[0] == ts[0].engine.key for k in hub.memory)  # source released


def _raises(fn) -> Exception:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("expected an exception")


def test_write_failure_reaches_both_sides(hub):
    hub.write_mode = "fail"
    ts = transports(2)
    works = run_ranks(lambda: ts[0].broadcast(torch.ones(8, dtype=torch.uint8), deadline()),
                      lambda: ts[1].broadcast(torch.zeros(8, dtype=torch.uint8), deadline()))
    with pytest.raises(WeightSyncError, match="retry exceeded"):
        works[0].wait()
    with pytest.raises(WeightSyncError, match="failed on the sender.*retry exceeded"):
        works[1].wait()


def test_stalled_write_times_out_then_abort_releases_receivers(hub):
    from datetime import timedelta
    hub.write_mode = "hang"
    ts = transports(2)
    works = run_ranks(lambda: ts[0].broadcast(torch.ones(8, dtype=torch.uint8), deadline()),
                      lambda: ts[1].broadcast(torch.zeros(8, dtype=torch.uint8), deadline()))
    assert not works[0].is_completed() and not works[1].is_completed()
    with pytest.raises(WeightSyncTimeout, match="in flight"):
        works[0].wait(timedelta(seconds=0.05))
    with pytest.raises(WeightSyncTimeout):
        works[1].wait(timedelta(seconds=0.05))
    ts[0].abort()
    with pytest.raises(WeightSyncError, match="aborted by the sender"):
        works[1].wait(timedelta(seconds=1))
    with pytest.raises(WeightSyncError, match="aborted"):
        ts[0].broadcast(torch.ones(8, dtype=torch.uint8), deadline())
    # A write may still read the source: it stays registered until close().
    assert any(k[0] == ts[0].engine.key for k in hub.memory)
    ts[1].abort()
    assert not any(k[0] == ts[1].engine.key for k in hub.memory)
    ts[0].close()
    assert hub.memory == {}
    assert {c.engine for c in hub.named("deregister_remote_engine")} == {ts[0].engine.key}


def test_receiver_sees_a_lost_store_as_an_error(hub):
    ts = transports(2)
    work = ts[1].broadcast(torch.zeros(8, dtype=torch.uint8), deadline())

    class Gone:
        def check(self, keys):
            raise dist.DistNetworkError("Connection reset by peer")

        def wait(self, keys, timeout):
            raise dist.DistNetworkError("Connection reset by peer")

    work.store = Gone()
    with pytest.raises(WeightSyncError, match="lost the trainer's store"):
        work.is_completed()
    with pytest.raises(WeightSyncError, match="lost the trainer's store"):
        work.wait()


def test_sync_group_barrier_and_errors_pass_through(hub):
    port = _free_port()
    groups = run_ranks(*[
        (lambda r=r: SyncGroup("127.0.0.1", port, r, 2, "mori", CPU, 5.0)) for r in (0, 1)])
    hub.write_mode = "fail"
    works = run_ranks(lambda: groups[0].broadcast(torch.ones(4, dtype=torch.uint8), deadline()),
                      lambda: groups[1].broadcast(torch.zeros(4, dtype=torch.uint8), deadline()))
    with pytest.raises(WeightSyncError, match="MoRI-IO broadcast 0 failed: RDMA write error"):
        groups[0].finish([works[0]], deadline())
    with pytest.raises(WeightSyncError, match="failed on the sender"):
        groups[1].wait(works[1], deadline())
    for g in reversed(groups):
        g.abort()
        g.close()
