"""Host-device copies off the critical path: one host->device copy for many small host
arrays, and device->host copies into pinned memory that do not wait."""
from __future__ import annotations

import numpy as np
import torch


def upload_packed(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Device tensors holding these 4- and 8-byte host arrays, moved with ONE copy: all
    are packed (16-byte aligned each) into one buffer, pinned on CUDA so the copy is
    asynchronous; the caching host allocator keeps it alive until the copy is done."""
    # Layout: 8-byte arrays, then 4-byte ones; each padded to 16 bytes by a spare piece.
    pieces: tuple[list[int], list[int]] = ([], [])  # (int64 units, int32 units)
    places = []  # per array: (4-byte area?, its piece index, its offset in area units)
    offsets = [0, 0]
    for array in arrays:
        narrow = array.itemsize == 4
        area, size = pieces[narrow], array.size
        places.append((narrow, len(area), offsets[narrow]))
        area.append(size)
        spare = -size % (4 if narrow else 2)
        if spare:
            area.append(spare)
        offsets[narrow] += size + spare
    num_wide = offsets[0]
    host = torch.empty(num_wide + offsets[1] // 2, dtype=torch.int64,
                       pin_memory=device.type == "cuda")
    wide_area = host.numpy()
    areas = (wide_area, wide_area[num_wide:].view(np.int32))
    typed = {}  # (area, dtype) -> the area viewed as that dtype
    for array, (narrow, _, offset) in zip(arrays, places):
        area = typed.get((narrow, array.dtype))
        if area is None:
            area = typed[narrow, array.dtype] = areas[narrow].view(array.dtype)
        area[offset:offset + array.size] = array.ravel() if array.ndim != 1 else array
    on_device = host if device.type == "cpu" else host.to(device, non_blocking=True)
    chunks = (on_device[:num_wide].split_with_sizes(pieces[0]) if pieces[0] else (),
              on_device[num_wide:].view(torch.int32).split_with_sizes(pieces[1])
              if pieces[1] else ())
    views = []
    for array, (narrow, piece, _) in zip(arrays, places):
        view = chunks[narrow][piece]
        if array.dtype.kind == "f":
            view = view.view(torch.float32 if narrow else torch.float64)
        views.append(view.view(array.shape) if array.ndim != 1 else view)
    return views


def pinned_copy(device_tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor the device tensor is being copied into (asynchronously: wait
    on an event recorded after this call before reading it)."""
    host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype, pin_memory=True)
    return host.copy_(device_tensor, non_blocking=True)
