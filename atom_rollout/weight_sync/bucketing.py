"""Pack named tensors into flat per-dtype buckets and unpack them back into views.

A bucket is a flat tensor of one dtype; each member tensor occupies a contiguous
element range of it. The plan (names, dtypes, shapes, offsets) is plain data so it
can travel as JSON ahead of the buckets.
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


def plan_buckets(named_tensors: Sequence[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> BucketPlan:
    """Assign each tensor to a per-dtype bucket of at most `bucket_bytes`.

    Tensors keep their input order within a dtype; a tensor larger than a bucket
    gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list] = []  # [dtype, numel]
    open_bucket: dict[torch.dtype, int] = {}
    specs, seen = [], set()
    for name, t in named_tensors:
        _check_item(name, t, seen)
        cap = max(bucket_bytes // t.element_size(), 1)
        n = t.numel()
        b = open_bucket.get(t.dtype)
        if b is None or buckets[b][1] + n > cap:
            b = len(buckets)
            buckets.append([t.dtype, 0])
            if n < cap:  # an oversized tensor's bucket is never reused
                open_bucket[t.dtype] = b
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape), b, buckets[b][1]))
        buckets[b][1] += n
    return BucketPlan(tuple(specs), tuple(BucketSpec(d, n) for d, n in buckets))


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
