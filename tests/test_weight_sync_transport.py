"""Weight-sync transport on CPU: bucketing, IPC metadata, and Gloo broadcasts between
a trainer process and receiver processes (the test process is one receiver)."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from atom_rollout.weight_sync import (BucketPlan, WeightReceiver, WeightSender,
                                      WeightSyncError, WeightSyncTimeout, export_ipc,
                                      pack_buckets, plan_buckets, rebuild_ipc,
                                      unpack_bucket, unpack_buckets)
from atom_rollout.weight_sync.header import Header, decode_header, encode_header

BUCKET = 64 * 1024
CTX = mp.get_context("spawn")


def make_update(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes, one tensor bigger than a bucket, many small ones, odd shapes."""
    g = torch.Generator().manual_seed(seed)
    named = [("embed.weight", torch.randn(200, 160, generator=g)),  # 128 KB > bucket
             ("norm.weight", torch.randn(160, generator=g).to(torch.bfloat16)),
             ("step", torch.randint(-2**40, 2**40, (), generator=g)),
             ("mask", torch.rand(33, generator=g) > 0.5),
             ("empty", torch.zeros(0, 4)),
             ("transposed", torch.randn(7, 9, generator=g).t())]  # non-contiguous
    for i in range(150):
        named.append((f"layers.{i}.w", torch.randn(6, 5, generator=g).to(torch.bfloat16)))
        named.append((f"layers.{i}.idx", torch.randint(0, 1000, (3,), generator=g,
                                                       dtype=torch.int32)))
    return named


def digest(named: list[tuple[str, torch.Tensor]]) -> list[tuple]:
    """Names, dtypes, shapes and a hash of the exact bytes of each tensor."""
    out = []
    for name, t in named:
        raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        out.append((name, str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- child processes

def run_sender(port: int, world_size: int, seeds: list[int], go, report,
               with_default_pg: bool = False, die_after_buckets: int | None = None) -> None:
    try:
        if with_default_pg:
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
            world_before = dist.group.WORLD
        sender = WeightSender("127.0.0.1", port, world_size, backend="gloo",
                              bucket_bytes=BUCKET, timeout_s=20)
        if die_after_buckets is not None:
            _die_after(sender, die_after_buckets)
        go.wait(30)
        stats = [sender.send(make_update(s), version=100 + s) for s in seeds]
        if with_default_pg:
            t = torch.ones(1)
            dist.all_reduce(t)  # the trainer's own group still works
            report.put(("default_pg", dist.group.WORLD is world_before,
                        dist.get_world_size(), float(t)))
            dist.destroy_process_group()
        report.put(("sent", [s.num_buckets for s in stats]))
        go.wait(30)  # keep the store alive until the receivers are done
        sender.close()
    except BaseException as e:  # noqa: BLE001 - report anything to the test
        report.put(("error", repr(e)))


def _die_after(sender: WeightSender, n: int) -> None:
    calls = {"n": 0}
    broadcast = sender._group.broadcast

    def dying_broadcast(tensor, deadline):
        calls["n"] += 1
        if calls["n"] > n:
            os.kill(os.getpid(), signal.SIGKILL)
        return broadcast(tensor, deadline)

    sender._group.broadcast = dying_broadcast


def run_receiver(port: int, rank: int, world_size: int, n_updates: int, report) -> None:
    try:
        recv = WeightReceiver("127.0.0.1", port, rank, world_size, backend="gloo",
                              timeout_s=20)
        for _ in range(n_updates):
            update = recv.receive()
            report.put(("update", rank, update.version, digest(update.named_tensors)))
        recv.close()
    except BaseException as e:  # noqa: BLE001
        report.put(("error", repr(e)))


def start(target, *args) -> mp.Process:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def stop(*procs: mp.Process) -> None:
    for p in procs:
        p.join(15)
        if p.is_alive():
            p.kill()


def expect(report, kind: str, timeout: float = 30):
    msg = report.get(timeout=timeout)
    assert msg[0] == kind, msg
    return msg


# ---------------------------------------------------------------- bucketing

def test_plan_respects_bucket_size_and_dtype():
    named = make_update(0)
    plan = plan_buckets(named, BUCKET)
    for spec in plan.tensors:
        assert plan.buckets[spec.bucket].dtype == spec.dtype
    big = plan.tensors[0]
    assert plan.members(big.bucket) == (0,)  # bigger than a bucket: a bucket of its own
    assert all(b.nbytes <= BUCKET for i, b in enumerate(plan.buckets) if i != big.bucket)
    assert plan.total_bytes == sum(t.numel() * t.element_size() for _, t in named)


def test_pack_unpack_bit_identical_and_json_roundtrip():
    named = make_update(1)
    plan, flats = pack_buckets(named, BUCKET)
    assert digest(unpack_buckets(plan, flats)) == digest(named)
    plan2 = BucketPlan.from_json(plan.to_json())
    assert plan2 == plan
    wire = [f.view(torch.uint8) for f in flats]  # what travels: raw bytes
    assert digest(unpack_buckets(plan2, wire)) == digest(named)
    views = unpack_bucket(plan, 1, flats[1])
    assert all(v.data_ptr() >= flats[1].data_ptr() for _, v in views)  # views, no copy


def test_corrupt_plan_rejected():
    plan = plan_buckets(make_update(2), BUCKET)
    bad = plan.to_json().replace('"embed.weight","float32",[200,160],0,0',
                                 '"embed.weight","float32",[200,161],0,0')
    with pytest.raises(ValueError, match="embed.weight"):
        BucketPlan.from_json(bad)
    with pytest.raises(ValueError, match="malformed"):
        BucketPlan.from_json('{"tensors": 3}')


def test_plan_input_errors():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([("a", torch.zeros(2))], 0)
    with pytest.raises(ValueError, match="duplicate name 'a'"):
        plan_buckets([("a", torch.zeros(2)), ("a", torch.zeros(2))], 1024)
    with pytest.raises(ValueError, match="named_tensors"):
        plan_buckets([("a", [1, 2])], 1024)


# ---------------------------------------------------------------- NCCL-path waiting logic

class FakeWork:
    def __init__(self, done_after: float = float("inf"), error: bool = False):
        self.t_done, self.error = time.monotonic() + done_after, error

    def is_completed(self) -> bool:
        if self.error:
            raise RuntimeError("NCCL communicator was aborted")
        return time.monotonic() >= self.t_done

    def wait(self) -> bool:
        return True


def test_poll_until_done_completes_times_out_and_notices_dead_peer():
    from atom_rollout.weight_sync.process_group import poll_until_done
    alive = lambda: None  # noqa: E731
    poll_until_done(FakeWork(0.05), time.monotonic() + 5, alive)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncTimeout):
        poll_until_done(FakeWork(), t0 + 0.3, alive)
    assert time.monotonic() - t0 < 1

    def dead():
        raise WeightSyncError("lost the trainer's store")
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="lost the trainer"):
        poll_until_done(FakeWork(), t0 + 30, dead)
    assert time.monotonic() - t0 < 2
    with pytest.raises(WeightSyncError, match="aborted"):
        poll_until_done(FakeWork(error=True), time.monotonic() + 5, alive)


# ---------------------------------------------------------------- IPC (metadata on CPU)

def test_ipc_header_roundtrip_and_cpu_rejected():
    header = Header(3, 7, plan_buckets(make_update(3), BUCKET).to_json())
    assert decode_header(encode_header(header)) == header
    with pytest.raises(WeightSyncError, match="malformed"):
        decode_header(b"not a header")
    with pytest.raises(ValueError, match="'embed.weight' is on cpu"):
        export_ipc(make_update(3))


def run_ipc_engine(payload, report) -> None:
    try:
        update = rebuild_ipc(payload)
        report.put(("ipc", update.version, digest([(n, t.cpu()) for n, t in update.named_tensors])))
    except BaseException as e:  # noqa: BLE001
        report.put(("error", repr(e)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs CUDA")
def test_ipc_roundtrip_cuda():
    named = [(n, t.cuda()) for n, t in make_update(4)]
    exported = export_ipc(named, bucket_bytes=BUCKET, version=5)
    report = CTX.Queue()
    engine = start(run_ipc_engine, exported.payload, report)
    try:
        _, version, got = expect(report, "ipc")
        assert version == 5 and got == digest(make_update(4))
    finally:
        stop(engine)


# ---------------------------------------------------------------- argument checks

def test_bad_backend_and_args_name_the_field():
    with pytest.raises(ValueError, match="backend"):
        WeightSender("127.0.0.1", free_port(), 2, backend="mpi")
    with pytest.raises(ValueError, match="backend"):
        WeightReceiver("127.0.0.1", free_port(), 1, 2, backend="NCCL ")
    with pytest.raises(ValueError, match="world_size"):
        WeightSender("127.0.0.1", free_port(), 1, backend="gloo")
    with pytest.raises(ValueError, match="rank"):
        WeightReceiver("127.0.0.1", free_port(), 0, 2, backend="gloo")
    with pytest.raises(ValueError, match="bucket_bytes"):
        WeightSender("127.0.0.1", free_port(), 2, backend="gloo", bucket_bytes=0)


def test_mori_missing_names_the_package():
    try:
        import mori  # noqa: F401
        pytest.skip("mori is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="'mori' package"):
        WeightSender("127.0.0.1", free_port(), 2, backend="mori")


# ---------------------------------------------------------------- over Gloo

def test_two_receivers_back_to_back_updates_bit_identical():
    port, report, go = free_port(), CTX.Queue(), CTX.Event()
    seeds = [10, 11, 12]
    sender = start(run_sender, port, 3, seeds, go, report)
    other = start(run_receiver, port, 2, 3, len(seeds), report)
    recv = WeightReceiver("127.0.0.1", port, 1, 3, backend="gloo", timeout_s=20)
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout):  # nothing sent yet: times out, stays usable
            recv.receive(timeout_s=0.5)
        assert time.monotonic() - t0 < 5
        go.set()
        hooked = []
        first = recv.receive(on_bucket=lambda i, views: hooked.extend(digest(views)))
        assert first.version == 110
        assert digest(first.named_tensors) == digest(make_update(10))
        assert sorted(hooked) == sorted(digest(make_update(10)))
        assert first.num_bytes > 0 and first.wire_s > 0

        def bad_hook(i, views):
            raise ValueError("engine rejected bucket")
        with pytest.raises(ValueError, match="engine rejected"):  # update drained anyway
            recv.receive(on_bucket=bad_hook)
        assert recv.error is None
        third = recv.receive()
        assert third.version == 112
        assert digest(third.named_tensors) == digest(make_update(12))

        msgs = [report.get(timeout=30) for _ in range(len(seeds) + 1)]  # any order
        assert ("error",) not in [m[:1] for m in msgs], msgs
        updates = [m[1:] for m in msgs if m[0] == "update"]
        assert updates == [(2, 100 + s, digest(make_update(s))) for s in seeds]
        n_buckets = len(plan_buckets(make_update(10), BUCKET).buckets)
        assert ("sent", [n_buckets] * len(seeds)) in msgs
    finally:
        go.set()
        recv.close()
        stop(sender, other)


def test_trainer_default_process_group_untouched():
    port, report, go = free_port(), CTX.Queue(), CTX.Event()
    go.set()
    sender = start(run_sender, port, 2, [20], go, report, True)
    recv = WeightReceiver("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=20)
    try:
        update = recv.receive()
        assert digest(update.named_tensors) == digest(make_update(20))
        _, same_world, world_size, reduced = expect(report, "default_pg")
        assert same_world and world_size == 1 and reduced == 1.0
        expect(report, "sent")
    finally:
        recv.close()
        stop(sender)


def test_sender_killed_mid_stream_raises_within_timeout():
    port, report, go = free_port(), CTX.Queue(), CTX.Event()
    go.set()
    sender = start(run_sender, port, 2, [30], go, report, False, 2)
    recv = WeightReceiver("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=5)
    caller_weights = torch.ones(10)
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as info:
            recv.receive()
        assert time.monotonic() - t0 < 5 + 3
        # Gloo may buffer the first buckets, so the sender can die before this receiver
        # has even read the header: the error then comes from the store, not a bucket.
        assert "failed" in str(info.value) or "died" in str(info.value)
        with pytest.raises(WeightSyncError):
            recv.receive(timeout_s=1)
        assert torch.equal(caller_weights, torch.ones(10))
        sender.join(10)
        assert sender.exitcode == -signal.SIGKILL
    finally:
        recv.close()
        stop(sender)
