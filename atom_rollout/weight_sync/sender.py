"""Trainer side: broadcast named tensors to every rollout rank in flat buckets."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .bucketing import BucketPlan, can_send_in_place, pack_bucket, plan_buckets
from .errors import WeightSyncError
from .header import Header, publish_header
from .process_group import SyncGroup, check_backend, check_group_args, resolve_device

_NUM_STAGING = 2  # pack bucket k+1 while bucket k is on the wire


@dataclass(frozen=True)
class SendStats:
    version: int | None
    num_tensors: int
    num_buckets: int
    num_bytes: int
    seconds: float  # send() call to every bucket delivered (host clock)


class WeightSender:
    """Rank 0 of a standalone group; `send` publishes a header then one broadcast per bucket.

    Receivers must be constructed concurrently (the constructor waits for all of them,
    up to `timeout_s`).
    """

    def __init__(self, master_address: str, master_port: int, world_size: int,
                 backend: str = "nccl", bucket_bytes: int = 512 * 2**20,
                 device: torch.device | str | int | None = None,
                 timeout_s: float = 600) -> None:
        check_backend(backend)
        check_group_args(master_port, 0, world_size, timeout_s)
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.device = resolve_device(backend, device)
        self._group = SyncGroup(master_address, master_port, 0, world_size, backend,
                                self.device, timeout_s)
        self._staging: list[torch.Tensor | None] = [None] * _NUM_STAGING
        self._staging_work: list = [None] * _NUM_STAGING
        self._seq = 0
        self._plan: BucketPlan | None = None
        self._plan_key: tuple | None = None
        self._plan_json = ""
        self._broken: str | None = None

    @torch.no_grad()
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
             version: int | None = None) -> SendStats:
        """Broadcast one whole update; returns once every bucket has been delivered."""
        if self._broken:
            raise WeightSyncError(f"sender is unusable after an earlier failure: {self._broken}")
        if version is not None and not isinstance(version, int):
            raise ValueError(f"version must be an int or None, got {version!r}")
        start = time.monotonic()
        named = list(named_tensors)
        plan = self._plan_for(named)
        tensors = [t for _, t in named]
        deadline = start + self._group.timeout_s
        try:
            publish_header(self._group.store, Header(self._seq, version, self._plan_json))
            works = [self._send_bucket(plan, i, tensors, deadline)
                     for i in range(len(plan.buckets))]
            self._group.finish(works, deadline)
        except Exception as e:  # noqa: BLE001 - any failure mid-update breaks the group
            self._fail(e)
        self._seq += 1
        return SendStats(version, len(named), len(plan.buckets), plan.total_bytes,
                         time.monotonic() - start)

    def _plan_for(self, named: list[tuple[str, torch.Tensor]]) -> BucketPlan:
        # RL updates repeat one layout; re-planning and re-encoding it each step is waste.
        key = tuple((n, getattr(t, "dtype", None), getattr(t, "shape", None))
                    for n, t in named)
        if key != self._plan_key:
            self._plan = plan_buckets(named, self.bucket_bytes)
            self._plan_key, self._plan_json = key, self._plan.to_json()
        return self._plan

    def _send_bucket(self, plan: BucketPlan, index: int, tensors: list[torch.Tensor],
                     deadline: float):
        if can_send_in_place(plan, index, tensors, self.device):
            flat = tensors[plan.members(index)[0]].view(-1)
            return self._group.broadcast(flat.view(torch.uint8), deadline)
        flat = pack_bucket(plan, index, tensors, out=self._staging_for(plan, index, deadline))
        work = self._group.broadcast(flat.view(torch.uint8), deadline)
        self._staging_work[index % _NUM_STAGING] = work
        return work

    def _staging_for(self, plan: BucketPlan, index: int, deadline: float) -> torch.Tensor:
        """A reusable uint8 buffer viewed as the bucket's dtype, once its last broadcast
        is done (a stream wait on CUDA, so packing stays asynchronous)."""
        spec, slot = plan.buckets[index], index % _NUM_STAGING
        if self._staging_work[slot] is not None:
            self._group.wait(self._staging_work[slot], deadline)
            self._staging_work[slot] = None
        if spec.nbytes > self.bucket_bytes:  # oversized, non-contiguous tensor: one-off
            return torch.empty(spec.numel, dtype=spec.dtype, device=self.device)
        if self._staging[slot] is None:
            self._staging[slot] = torch.empty(self.bucket_bytes, dtype=torch.uint8,
                                              device=self.device)
        return self._staging[slot][:spec.nbytes].view(spec.dtype)

    def _fail(self, error: Exception) -> None:
        self._broken = str(error)
        self._group.abort()
        if isinstance(error, WeightSyncError):
            raise error
        raise WeightSyncError(f"weight update {self._seq} failed: {error}") from error

    def close(self) -> None:
        """Release the buffers and the group (receivers then see the sender as gone)."""
        self._staging = [None] * _NUM_STAGING
        self._staging_work = [None] * _NUM_STAGING
        self._group.close()
