"""Rollout side: receive one whole update into reusable buffers and hand back views."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .bucketing import BucketPlan, unpack_bucket, unpack_buckets
from .errors import WeightSyncError, WeightSyncTimeout
from .header import acknowledge_header, decode_plan, fetch_header
from .process_group import SyncGroup, check_backend, check_group_args, resolve_device

# Called per bucket as it lands, in bucket order: (bucket index, [(name, view), ...]).
# On CUDA "lands" means: work the hook issues on the current stream runs after the
# bucket's data arrived; the update is only known whole when receive() returns.
BucketHook = Callable[[int, list[tuple[str, torch.Tensor]]], None]
# Called once the update's layout is known, before any bucket is delivered.
PlanHook = Callable[[BucketPlan], None]


@dataclass
class ReceivedUpdate:
    version: int | None
    named_tensors: list[tuple[str, torch.Tensor]]  # views into the receiver's buffers
    num_buckets: int = 0
    num_bytes: int = 0
    header_wait_s: float = 0.0  # idle until the sender published the update
    wire_s: float = 0.0  # first bucket posted -> last bucket delivered (host clock)
    total_s: float = 0.0

    @property
    def wire_gbps(self) -> float:
        return self.num_bytes / self.wire_s / 1e9 if self.wire_s > 0 else 0.0


class WeightReceiver:
    """A rollout rank (1..world_size-1) of the weight-sync group.

    The views returned by `receive` alias buffers that the next `receive` overwrites
    when the layout is unchanged (reuse_buffers=True): apply or copy them first.
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 backend: str = "nccl", device: torch.device | str | int | None = None,
                 timeout_s: float = 600, reuse_buffers: bool = True) -> None:
        check_backend(backend)
        check_group_args(master_port, rank, world_size, timeout_s)
        if rank == 0:
            raise ValueError("rank 0 is the trainer (WeightSender); receivers use 1..")
        self.device = resolve_device(backend, device)
        self.timeout_s, self.reuse_buffers = timeout_s, reuse_buffers
        self._group = SyncGroup(master_address, master_port, rank, world_size, backend,
                                self.device, timeout_s)
        self._seq = 0
        self._plan_json = ""
        self._plan: BucketPlan | None = None
        self._buffers: list[torch.Tensor] = []
        self._views: list[tuple[str, torch.Tensor]] = []
        self._bucket_views: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self.error: str | None = None  # set once the group is broken
        self._unacknowledged: int | None = None  # last update whose header is not acked

    def receive(self, timeout_s: float | None = None, on_bucket: BucketHook | None = None,
                on_plan: PlanHook | None = None) -> ReceivedUpdate:
        """Block until one whole update arrived (or raise WeightSyncError by the deadline).

        A timeout before the sender starts leaves the receiver usable; any failure after
        buckets started flowing breaks the group (see `error`). Caller tensors are never
        written. An exception from a hook stops the hooks, the update is still drained
        (every rank stays in step) and the exception is raised.
        """
        if self.error:
            raise WeightSyncError(f"receiver is unusable after an earlier failure: {self.error}")
        self._acknowledge_previous()
        start = time.monotonic()
        deadline = start + (self.timeout_s if timeout_s is None else timeout_s)
        header = fetch_header(self._group.store, self._seq, deadline, self.timeout_s)
        posted = time.monotonic()
        try:
            plan = self._prepare(header.plan_json)
            hook_error = _call_plan_hook(on_plan, plan)
            if hook_error is not None:
                on_bucket = None
            hook_error = self._receive_buckets(plan, deadline, on_bucket) or hook_error
        except Exception as e:  # noqa: BLE001 - any failure mid-update breaks the group
            self._fail(e)
        done = time.monotonic()
        self._unacknowledged = self._seq  # store cleanup, off the update's critical path
        self._seq += 1
        if hook_error is not None:  # the update was drained: the receiver stays usable
            raise hook_error
        return ReceivedUpdate(header.version, self._named_views(plan), len(plan.buckets),
                              plan.total_bytes, posted - start, done - posted, done - start)

    def _prepare(self, plan_json: str) -> BucketPlan:
        """Decode the plan and provide one uint8 buffer per bucket (reused when the
        layout is unchanged, which is every step of an RL run)."""
        if plan_json == self._plan_json and self.reuse_buffers:
            return self._plan
        plan = decode_plan(plan_json)
        self._buffers = [torch.empty(b.nbytes, dtype=torch.uint8, device=self.device)
                         for b in plan.buckets]
        self._plan, self._plan_json = plan, plan_json
        self._views, self._bucket_views = [], {}
        return plan

    def _receive_buckets(self, plan: BucketPlan, deadline: float,
                         on_bucket: BucketHook | None) -> Exception | None:
        """Post every bucket's broadcast, run the hook per landed bucket, wait for all.
        A hook error stops the hook but not the transfer; it is returned."""
        works = [self._group.broadcast(buf, deadline) for buf in self._buffers]
        hook_error = None
        for i, work in enumerate(works if on_bucket is not None else []):
            self._group.wait(work, deadline)
            try:
                on_bucket(i, self._views_of_bucket(plan, i))
            except Exception as e:  # noqa: BLE001 - drained below, keeping ranks in step
                hook_error = e
                break
        self._group.finish(works, deadline)
        if self._group.backend == "nccl":  # later work on the current stream sees the data
            works[-1].wait()
        return hook_error

    def _views_of_bucket(self, plan: BucketPlan, i: int) -> list[tuple[str, torch.Tensor]]:
        if i not in self._bucket_views:
            self._bucket_views[i] = unpack_bucket(plan, i, self._buffers[i])
        return list(self._bucket_views[i])

    def _named_views(self, plan: BucketPlan) -> list[tuple[str, torch.Tensor]]:
        # Building hundreds of views costs ~ms of host time; cache them with the buffers.
        if not self._views:
            self._views = unpack_buckets(plan, self._buffers)
        return list(self._views)

    def _fail(self, error: Exception) -> None:
        self.error = f"weight update {self._seq} failed: {error}"
        self._group.abort()
        self._buffers, self._views, self._bucket_views, self._plan_json = [], [], {}, ""
        cls = WeightSyncTimeout if isinstance(error, WeightSyncTimeout) else WeightSyncError
        raise cls(self.error) from error

    def _acknowledge_previous(self) -> None:
        """Count the last update as done (the last receiver deletes its header): only
        store cleanup, so a store that is gone is left to the next fetch to report."""
        if self._unacknowledged is None:
            return
        seq, self._unacknowledged = self._unacknowledged, None
        try:
            acknowledge_header(self._group.store, seq, self._group.world_size - 1)
        except (RuntimeError, dist.DistError):
            pass

    def close(self) -> None:
        self._acknowledge_previous()
        self._buffers, self._views, self._bucket_views = [], [], {}
        self._group.close()


def _call_plan_hook(on_plan: PlanHook | None, plan: BucketPlan) -> Exception | None:
    if on_plan is None:
        return None
    try:
        on_plan(plan)
    except Exception as e:  # noqa: BLE001 - returned, raised once the update is drained
        return e
    return None
