"""Write a weight broadcast into the model bucket by bucket as it lands, all or nothing.

Staging the whole update and copying it in after the last bucket costs one more full
pass over the weights after the wire (~12 ms for an 8B model on an H100). Instead every
landed bucket is written at once, overlapping the transfer of the next buckets, and
stays undoable: the parameter slices a bucket overwrites are first copied aside, into
the receive buffer of the bucket before it (its data is already in the model) or, for
the first bucket, into a scratch buffer. A failure at any point copies them back:
- names and shapes are checked from the update's header, before any bucket is written;
- non-finite values are flagged per bucket on the device and read once at the end;
- a dead or stalled trainer ends the receive with an error.
After an update the receive buffers hold no usable tensors. Nothing may run a forward
between the first bucket and `commit`/`rollback`: callers hold the engine throughout.
An RL run repeats one layout, so the name matching and parameter views are computed once
per layout and reused.

On a GPU a bucket whose parameter slices share the bucket's float dtype is written by one
Triton launch (kernels/triton/weight_apply.py): keep, write and NaN/inf flag in a single
pass, from a segment table built once per layout. Anything else (mixed dtypes, CPU,
no Triton, one bucket writing a parameter region twice) takes the multi-tensor torch
path: a max-abs reduction and two `_foreach_copy_`. Rollback is the same torch copy for
both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kernels.triton import is_available as triton_available
from ..models import WeightMap
from ..weight_sync.bucketing import BucketPlan

if TYPE_CHECKING:
    from ..kernels.triton.weight_apply import ApplyTable

_ALIGN = 16  # bytes; every saved slice starts aligned for any dtype view


@dataclass
class _BucketLayout:
    picks: list[int]  # positions in the bucket's view list that go into the model
    names: list[str]
    params: list[torch.Tensor]  # the parameter slices they overwrite
    flat_params: list[torch.Tensor]  # the same, 1-D (parameter slices are contiguous)
    dtype: torch.dtype | None  # their dtype when they share one (the usual case)
    covers_bucket: bool  # every tensor of the bucket goes into the model
    src_offsets: list[int]  # where each slice's data starts in the bucket (elements)
    table: ApplyTable | None = None  # set when the Triton kernel writes this bucket
    saved_bytes: int = 0  # room needed to keep the slices aside (set from params)
    _saved: list[torch.Tensor] | None = None
    _saved_key: tuple | None = None

    def __post_init__(self) -> None:
        self.saved_bytes = sum(_aligned(p) for p in self.params)

    def saved_offsets(self) -> list[int]:
        """Element offsets of the saved slices in the room (one shared dtype)."""
        offsets, at = [], 0
        for p in self.params:
            offsets.append(at // p.element_size())
            at += _aligned(p)
        return offsets

    def saved_slices(self, room: torch.Tensor) -> list[torch.Tensor]:
        """1-D views of a flat uint8 buffer, one per parameter slice (cached: in an RL
        run bucket i always keeps its slices in the same buffer)."""
        key = (room.data_ptr(), room.numel())
        if self._saved_key != key:
            self._saved, self._saved_key = self._slices(room), key
        return self._saved

    def _slices(self, room: torch.Tensor) -> list[torch.Tensor]:
        if self.dtype is not None:  # one split instead of a view per tensor
            typed = room[:self.saved_bytes].view(self.dtype)
            sizes = [_aligned(p) // p.element_size() for p in self.params]
            return [piece[:p.numel()] for piece, p in zip(typed.split(sizes), self.params)]
        out, offset = [], 0
        for p in self.params:
            out.append(room[offset:offset + p.numel() * p.element_size()].view(p.dtype))
            offset += _aligned(p)
        return out


class StreamedUpdate:
    def __init__(self, weight_map: WeightMap, use_kernel: bool | None = None,
                 kernel_chunk: int | None = None) -> None:
        """use_kernel: None picks the Triton kernel where it applies on a CUDA device,
        True also elsewhere (CPU under TRITON_INTERPRET, for tests), False never.
        kernel_chunk: elements per kernel program (None: the kernel's default)."""
        self.weight_map = weight_map
        self.use_kernel, self.kernel_chunk = use_kernel, kernel_chunk
        self._params = list({id(t.param): t.param for t in weight_map.targets.values()}.values())
        self.check_finite = True
        self._layout_key: tuple | None = None
        self._layouts: list[_BucketLayout] = []
        self._scratch: torch.Tensor | None = None
        self._scratch_in_use = False
        self._previous_buffer: torch.Tensor | None = None
        self._undo: list[tuple[_BucketLayout, torch.Tensor]] = []  # (layout, saved room)
        self._finite: list[tuple[int, torch.Tensor]] = []  # (bucket, its max |value|)
        self._flags: torch.Tensor | None = None  # int32 per bucket, set by the kernel
        self._flagged = False  # a kernel apply this update checked for NaN/inf

    def begin(self, partial: bool = True, check_finite: bool = True):
        """Start one update; returns the plan hook for the receiver."""
        self.rollback()
        self.check_finite = check_finite
        return lambda plan: self.check_plan(plan, partial)

    def check_plan(self, plan: BucketPlan, partial: bool = True) -> None:
        """Reject unknown names, wrong shapes and (partial=False) missing tensors."""
        addresses = self._param_addresses()
        key = self._layout_key
        if key is None or not (key[0] is plan or key[0] == plan) or key[1:] != (partial,
                                                                                addresses):
            self._layouts = self._plan_layouts(plan, partial)
            self._layout_key = (plan, partial, addresses)
            self._flags = self._new_flags()
        elif self._flags is not None:
            self._flags.zero_()

    def _param_addresses(self) -> tuple[int, ...]:
        # parameters move on sleep(offload_weights=True) / wake_up(): views must follow
        return tuple(p.data_ptr() for p in self._params)

    def _plan_layouts(self, plan: BucketPlan, partial: bool) -> list[_BucketLayout]:
        entries = [(t.name, t.shape) for t in plan.tensors]
        target_of = dict(self.weight_map.match(entries, partial))
        layouts = []
        for index in range(len(plan.buckets)):
            members = plan.members(index)
            picks = [pos for pos, i in enumerate(members) if i in target_of]
            params = [target_of[members[pos]].view() for pos in picks]
            dtypes = {p.dtype for p in params}
            layout = _BucketLayout(
                picks, [plan.tensors[members[p]].name for p in picks], params,
                [p.view(-1) for p in params], dtypes.pop() if len(dtypes) == 1 else None,
                len(picks) == len(members), [plan.tensors[members[p]].offset for p in picks])
            if self._kernel_fits(layout, plan.buckets[index].dtype):
                layout.table = _weight_apply().build_table(
                    layout.flat_params, layout.src_offsets, layout.saved_offsets(),
                    self.kernel_chunk)
            layouts.append(layout)
        return layouts

    def _kernel_fits(self, layout: _BucketLayout, bucket_dtype: torch.dtype) -> bool:
        if self.use_kernel is False or not layout.params or layout.dtype != bucket_dtype:
            return False
        device = layout.params[0].device
        if any(p.device != device for p in layout.params) or _overlap(layout.flat_params):
            return False  # two programs racing on one element would break the undo copy
        if self.use_kernel is None and not triton_available(device):
            return False
        return _weight_apply().supports(layout.dtype)

    def _new_flags(self) -> torch.Tensor | None:
        tables = [layout for layout in self._layouts if layout.table is not None]
        if not tables:
            return None
        return torch.zeros(len(self._layouts), dtype=torch.int32,
                           device=tables[0].params[0].device)

    @torch.no_grad()
    def apply_bucket(self, index: int, views: list[tuple[str, torch.Tensor]]) -> None:
        """Write one landed bucket (its views in plan order), keeping what it overwrote."""
        layout = self._layouts[index]
        buffer = _whole_buffer(views[0][1]) if views else None
        if layout.params:
            room = self._room(layout.saved_bytes, layout.params[0].device)
            source = _kernel_source(layout, views)
            if source is not None:
                self._apply_kernel(index, layout, source, room)
            else:
                self._apply_torch(index, layout, views, buffer, room)
            self._undo.append((layout, room))
        self._previous_buffer = buffer  # consumed above: the next bucket's spare room

    def _apply_kernel(self, index: int, layout: _BucketLayout, source: torch.Tensor,
                      room: torch.Tensor) -> None:
        flags = self._flags if self.check_finite else None
        _weight_apply().apply_bucket(layout.table, source, room[:layout.saved_bytes],
                                     flags, index)
        self._flagged = self._flagged or flags is not None

    def _apply_torch(self, index: int, layout: _BucketLayout,
                     views: list[tuple[str, torch.Tensor]], buffer: torch.Tensor,
                     room: torch.Tensor) -> None:
        incoming = [views[pos][1] for pos in layout.picks]
        if self.check_finite:
            self._flag_non_finite(index, layout, buffer, incoming)
        saved = layout.saved_slices(room)
        torch._foreach_copy_(saved, layout.flat_params)
        torch._foreach_copy_(layout.params, incoming)

    def _room(self, nbytes: int, device: torch.device) -> torch.Tensor:
        spare = self._previous_buffer
        if spare is not None and spare.numel() >= nbytes and spare.device == device:
            self._previous_buffer = None
            return spare
        if self._scratch_in_use:  # it holds an earlier bucket's slices
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if (self._scratch is None or self._scratch.numel() < nbytes
                or self._scratch.device != device):
            self._scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._scratch_in_use = True
        return self._scratch

    def _flag_non_finite(self, index: int, layout: _BucketLayout, buffer: torch.Tensor,
                         incoming: list[torch.Tensor]) -> None:
        """One max-abs reduction over the bucket (NaN and inf survive a max); which
        tensors were bad is only worked out if one was."""
        dtype = incoming[0].dtype
        if not dtype.is_floating_point:
            return
        if layout.covers_bucket:
            peak = torch.linalg.vector_norm(buffer.view(dtype), ord=float("inf"))
        else:
            peak = torch.stack(torch._foreach_norm(incoming, ord=float("inf"))).max()
        self._finite.append((index, peak))

    def commit(self) -> None:
        """After the last bucket: one host read of the finiteness flags; roll back and
        raise ValueError naming the tensors if any held NaN/inf."""
        bad_buckets = self._bad_buckets()
        if bad_buckets:
            bad = self._non_finite_names(bad_buckets) or [
                f"bucket {i}" for i in bad_buckets]  # e.g. overflow only in transit
            self.rollback()
            shown = ", ".join(bad[:20]) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
            raise ValueError(f"named_tensors: non_finite tensors: {shown}")
        self._end()

    def _bad_buckets(self) -> list[int]:
        """Kernel flags and torch-path peaks, read back together."""
        owners, parts = [], []
        if self._flagged:
            owners += range(len(self._layouts))
            parts.append(self._flags)
        if self._finite:
            owners += [index for index, _ in self._finite]
            peaks = torch.stack([peak for _, peak in self._finite])
            parts.append((~torch.isfinite(peaks)).to(torch.int32))
        if not parts:
            return []
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        return sorted({index for index, bad in zip(owners, values.tolist()) if bad})

    def _non_finite_names(self, buckets: list[int]) -> list[str]:
        """The bad buckets' data now sits in the parameters (not yet rolled back)."""
        names = []
        for index in buckets:
            layout = self._layouts[index]
            peaks = torch.stack(torch._foreach_norm(layout.params, ord=float("inf")))
            names += [n for n, ok in zip(layout.names, torch.isfinite(peaks).tolist()) if not ok]
        return names

    @torch.no_grad()
    def rollback(self) -> None:
        """Put back every slice written so far (newest first, so a tensor sent twice ends
        at its original value)."""
        for layout, room in reversed(self._undo):
            torch._foreach_copy_(layout.flat_params, layout.saved_slices(room))
        self._end()

    def _end(self) -> None:
        self._undo, self._finite, self._flagged = [], [], False
        self._previous_buffer, self._scratch_in_use = None, False


def _weight_apply():
    # Imported on first use, so that @triton.jit runs after TRITON_INTERPRET is chosen.
    from ..kernels.triton import weight_apply
    return weight_apply


def _kernel_source(layout: _BucketLayout,
                   views: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """The flat bucket the kernel reads, or None for the torch path: no kernel for this
    layout, or views that are not laid out as the plan says (checked at both ends)."""
    table = layout.table
    if table is None:
        return None
    first, last = views[layout.picks[0]][1], views[layout.picks[-1]][1]
    start = first.storage_offset() - layout.src_offsets[0]
    if (first.dtype != table.dtype or first.device != table.segments.device or start < 0
            or last.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or last.storage_offset() - start != layout.src_offsets[-1]):
        return None
    return first.as_strided((table.src_numel,), (1,), start)


def _overlap(flat: list[torch.Tensor]) -> bool:
    """Whether any two slices share an element (a name and its tied alias in one bucket)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in flat if t.numel())
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def _aligned(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN


def _whole_buffer(view: torch.Tensor) -> torch.Tensor:
    """The flat uint8 receive buffer a bucket view lives in (each bucket has its own)."""
    storage = view.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=view.device)
    return flat.set_(storage, 0, (storage.nbytes(),))
