"""The update header: sequence number, version and bucket plan, as bytes.

The sender publishes it in the group's TCPStore before broadcasting buckets, so a
receiver idles on a store wait (cheap, with its own timeout) rather than on a pending
collective, and allocates its buffers before the first bucket arrives.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .bucketing import BucketPlan
from .errors import WeightSyncError, WeightSyncTimeout

FORMAT = 1


@dataclass(frozen=True)
class Header:
    seq: int
    version: int | None
    plan_json: str  # kept as text: an unchanged layout is detected by string equality


def encode_header(header: Header) -> bytes:
    head = json.dumps({"format": FORMAT, "seq": header.seq, "version": header.version})
    return (head + "\n" + header.plan_json).encode()


def decode_header(raw: bytes) -> Header:
    try:
        head_text, plan_json = raw.decode().split("\n", 1)
        head = json.loads(head_text)
        if head.get("format") != FORMAT:
            raise ValueError(f"header format {head.get('format')!r}, expected {FORMAT}")
        version = head["version"]
        if version is not None and not isinstance(version, int):
            raise ValueError(f"version must be an int or None, got {version!r}")
        return Header(int(head["seq"]), version, plan_json)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightSyncError(f"malformed update header: {e}") from e


def _key(seq: int) -> str:
    return f"atom_ws/update/{seq}"


def publish_header(store: dist.Store, header: Header) -> None:
    store.set(_key(header.seq), encode_header(header))


def fetch_header(store: dist.Store, seq: int, deadline: float,
                 store_timeout_s: float) -> Header:
    """Wait (until `deadline`, time.monotonic) for update `seq`'s header."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise WeightSyncTimeout(f"no weight update {seq} started before the deadline")
    try:
        store.set_timeout(timedelta(seconds=remaining))
        raw = store.get(_key(seq))  # blocks until the key exists: one round trip
    except dist.DistStoreError as e:
        raise WeightSyncTimeout(
            f"no weight update {seq} started within {remaining:.1f}s") from e
    except dist.DistError as e:
        raise WeightSyncError(f"lost the sender's store while waiting for update {seq} "
                              f"(sender closed or died): {e}") from e
    finally:
        store.set_timeout(timedelta(seconds=store_timeout_s))
    header = decode_header(raw)
    if header.seq != seq:
        raise WeightSyncError(f"header for update {seq} carries seq {header.seq}")
    return header


def acknowledge_header(store: dist.Store, seq: int, num_receivers: int) -> None:
    """Count this receiver as done; the last one deletes the header."""
    if store.add(_key(seq) + "/acks", 1) == num_receivers:
        store.delete_key(_key(seq))
        store.delete_key(_key(seq) + "/acks")


def decode_plan(plan_json: str) -> BucketPlan:
    try:
        return BucketPlan.from_json(plan_json)
    except ValueError as e:
        raise WeightSyncError(f"update header failed its integrity check: {e}") from e
