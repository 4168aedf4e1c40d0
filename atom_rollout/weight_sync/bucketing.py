"""Pack named tensors into flat per-dtype buckets and unpack them back into views.

A bucket is a flat tensor of one dtype; each member tensor occupies a contiguous
element range of it. The plan (names, dtypes, shapes, offsets) is plain data so it
can travel as JSON ahead of the buckets.

Bucket sizes taper toward the end of an update. A receiver writes each bucket into its
model while the next ones are on the wire, so only the last bucket's write is not hidden
behind the transfer: a last bucket of a few hundred MB costs a few hundred microseconds
of GPU time after the wire is done. So
- a tensor larger than a bucket (an 8B model's embedding and untied lm_head, 1.2 GB
  each) gets its own bucket as before, but all of those are sent first;
- every other bucket holds at most half of the bytes not yet planned (and never more
  than `bucket_bytes`): sizes halve over the last ~2 x bucket_bytes of the update,
  down to `tail_bytes` (default bucket_bytes / 8, at most 32 MiB), which caps the final
  buckets.
Halving matches a write that runs at about twice the wire's rate: the one-pass Triton
write moves 4 bytes of HBM traffic per byte received, ~0.7 TB/s on an H100, against
~0.36 TB/s of NVLink broadcast, so a bucket's write roughly ends while the next,
half-sized bucket is on the wire. It costs a handful of extra broadcasts per update and
nothing in the header: every bucket's size and place travel in the plan as before.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    bucket: int
    offset: int  # in elements of the bucket's dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class BucketSpec:
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class BucketPlan:
    tensors: tuple[TensorSpec, ...]  # in input order
    buckets: tuple[BucketSpec, ...]  # in creation order
    _members: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: list[list[int]] = [[] for _ in self.buckets]
        for i, spec in enumerate(self.tensors):
            if 0 <= spec.bucket < len(members):
                members[spec.bucket].append(i)
        object.__setattr__(self, "_members", tuple(tuple(m) for m in members))

    def members(self, bucket: int) -> tuple[int, ...]:
        """Indices into `tensors` of the tensors stored in `bucket`, in offset order."""
        return self._members[bucket]

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def to_json(self) -> str:
        return json.dumps({
            "tensors": [[t.name, _dtype_name(t.dtype), list(t.shape), t.bucket, t.offset]
                        for t in self.tensors],
            "buckets": [[_dtype_name(b.dtype), b.numel] for b in self.buckets],
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "BucketPlan":
        """Decode and validate a plan; ValueError on any inconsistency."""
        try:
            raw = json.loads(text)
            buckets = tuple(BucketSpec(_dtype(d), int(n)) for d, n in raw["buckets"])
            tensors = tuple(TensorSpec(str(name), _dtype(d), tuple(int(s) for s in shape),
                                       int(b), int(off))
                            for name, d, shape, b, off in raw["tensors"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed bucket plan: {e}") from e
        plan = cls(tensors, buckets)
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check that every tensor lies inside its bucket, with the bucket's dtype."""
        names = set()
        for t in self.tensors:
            if t.name in names:
                raise ValueError(f"bucket plan: duplicate tensor name {t.name!r}")
            names.add(t.name)
            if not 0 <= t.bucket < len(self.buckets):
                raise ValueError(f"bucket plan: {t.name!r} has bucket {t.bucket} "
                                 f"of {len(self.buckets)}")
            b = self.buckets[t.bucket]
            if t.dtype != b.dtype or min(t.shape, default=0) < 0 or t.offset < 0 \
                    or t.offset + t.numel > b.numel:
                raise ValueError(f"bucket plan: {t.name!r} ({t.dtype}, {t.shape}, offset "
                                 f"{t.offset}) does not fit bucket {t.bucket} "
                                 f"({b.dtype}, {b.numel} elements)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


TAIL_BYTES = 32 * 2**20  # the default tail_bytes is at most this


def plan_buckets(named_tensors: Sequence[tuple[str, torch.Tensor]], bucket_bytes: int,
                 tail_bytes: int | None = None) -> BucketPlan:
    """Assign each tensor to a per-dtype bucket of at most `bucket_bytes`, tapering
    toward `tail_bytes` at the end of the update (see the module docstring; None:
    min(bucket_bytes // 8, 32 MiB); tail_bytes >= bucket_bytes: no tapering).

    A tensor larger than `bucket_bytes` gets a bucket of its own, sent before all the
    others; the rest keep their input order within a dtype, and one that does not fit
    a tapered bucket's cap also gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if tail_bytes is None:
        tail_bytes = max(min(bucket_bytes // 8, TAIL_BYTES), 1)
    if tail_bytes <= 0:
        raise ValueError(f"tail_bytes must be > 0, got {tail_bytes}")
    seen: set = set()
    for name, t in named_tensors:
        _check_item(name, t, seen)
    oversized = [i for i, (_, t) in enumerate(named_tensors) if _nbytes(t) > bucket_bytes]
    buckets: list[list] = [[t.dtype, t.numel(), t.numel()]  # [dtype, numel, cap]
                           for t in (named_tensors[i][1] for i in oversized)]
    where = {i: (b, 0) for b, i in enumerate(oversized)}  # tensor -> (bucket, offset)
    where.update(_tapered(named_tensors, set(oversized), bucket_bytes, tail_bytes, buckets))
    specs = tuple(TensorSpec(name, t.dtype, tuple(t.shape), *where[i])
                  for i, (name, t) in enumerate(named_tensors))
    return BucketPlan(specs, tuple(BucketSpec(d, n) for d, n, _ in buckets))


def _tapered(named_tensors: Sequence[tuple[str, torch.Tensor]], skip: set[int],
             bucket_bytes: int, tail_bytes: int,
             buckets: list[list]) -> dict[int, tuple[int, int]]:
    """Greedy per-dtype packing in input order, appending [dtype, numel, cap] rows to
    `buckets`; a new bucket's cap is half the bytes still to place, clamped to
    [tail_bytes, bucket_bytes]. Returns tensor index -> (bucket, offset)."""
    remaining = sum(_nbytes(t) for i, (_, t) in enumerate(named_tensors) if i not in skip)
    open_bucket: dict[torch.dtype, int] = {}
    where = {}
    for i, (_, t) in enumerate(named_tensors):
        if i in skip:
            continue
        n = t.numel()
        b = open_bucket.get(t.dtype)
        if b is None or buckets[b][1] + n > buckets[b][2]:
            cap_bytes = min(bucket_bytes, max(tail_bytes, remaining // 2))
            b = len(buckets)
            buckets.append([t.dtype, 0, max(cap_bytes // t.element_size(), 1)])
            if n < buckets[b][2]:  # a tensor that fills its bucket alone: not reused
                open_bucket[t.dtype] = b
        where[i] = (b, buckets[b][1])
        buckets[b][1] += n
        remaining -= _nbytes(t)
    return where


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_item(name: object, t: object, seen: set) -> None:
    if not isinstance(name, str) or not isinstance(t, torch.Tensor):
        raise ValueError(f"named_tensors must hold (str, torch.Tensor) pairs, got "
                         f"({type(name).__name__}, {type(t).__name__}) for {name!r}")
    if name in seen:
        raise ValueError(f"named_tensors: duplicate name {name!r}")
    seen.add(name)


def can_send_in_place(plan: BucketPlan, index: int, tensors: Sequence[torch.Tensor],
                      device: torch.device) -> bool:
    """A bucket holding one contiguous tensor already on `device` needs no packing."""
    members = plan.members(index)
    if len(members) != 1:
        return False
    t = tensors[members[0]]
    return t.is_contiguous() and t.device == device


@torch.no_grad()
def pack_bucket(plan: BucketPlan, index: int, tensors: Sequence[torch.Tensor],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy bucket `index`'s members of `tensors` (aligned with plan.tensors) into a
    flat tensor of the bucket's dtype; `out` (right dtype and numel) avoids allocating."""
    spec = plan.buckets[index]
    members = [tensors[i] for i in plan.members(index)]
    if out is None:
        device = members[0].device if members else torch.device("cpu")
        out = torch.empty(spec.numel, dtype=spec.dtype, device=device)
    if all(t.device == out.device for t in members):
        torch.cat([t.reshape(-1) for t in members], out=out)  # one kernel for the bucket
        return out
    for i in plan.members(index):  # mixed devices: copy each across
        t = plan.tensors[i]
        out[t.offset:t.offset + t.numel].copy_(tensors[i].reshape(-1), non_blocking=True)
    return out


def pack_buckets(named_tensors: NamedTensors,
                 bucket_bytes: int) -> tuple[BucketPlan, list[torch.Tensor]]:
    """Plan and pack in one go (fresh buffers; the sender uses a reusable pool instead)."""
    named = list(named_tensors)
    plan = plan_buckets(named, bucket_bytes)
    tensors = [t for _, t in named]
    return plan, [pack_bucket(plan, i, tensors) for i in range(len(plan.buckets))]


def unpack_bucket(plan: BucketPlan, index: int,
                  flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` (bucket `index`, any dtype of the right byte size) per member."""
    flat = as_bucket_dtype(plan, index, flat)
    out = []
    for i in plan.members(index):
        t = plan.tensors[i]
        out.append((t.name, flat[t.offset:t.offset + t.numel].view(t.shape)))
    return out


def unpack_buckets(plan: BucketPlan,
                   flats: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Views for every tensor of the plan, in the plan's (input) order."""
    if len(flats) != len(plan.buckets):
        raise ValueError(f"expected {len(plan.buckets)} buckets, got {len(flats)}")
    typed = [as_bucket_dtype(plan, i, f) for i, f in enumerate(flats)]
    return [(t.name, typed[t.bucket][t.offset:t.offset + t.numel].view(t.shape))
            for t in plan.tensors]


def as_bucket_dtype(plan: BucketPlan, index: int, flat: torch.Tensor) -> torch.Tensor:
    """Reinterpret a flat buffer (e.g. the uint8 wire buffer) as the bucket's dtype."""
    spec = plan.buckets[index]
    if flat.dtype != spec.dtype:
        flat = flat.view(torch.uint8).view(spec.dtype)
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"bucket {index}: expected {spec.numel} elements of {spec.dtype}, "
                         f"got shape {tuple(flat.shape)}")
    return flat
