"""Colocated trainer and engine on one GPU: share packed buckets by CUDA IPC handle.

The sender packs into fresh buckets and exports handles (torch's own reductions, the
ones torch.multiprocessing pickles); the engine process rebuilds views onto the same
memory and copies from them. The sender must keep `IpcExport.buffers` alive until the
engine has applied the update.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import reduce_tensor

from .bucketing import pack_bucket, plan_buckets, unpack_buckets
from .header import Header, decode_header, decode_plan, encode_header
from .receiver import ReceivedUpdate

# Position of the device index in the args of torch's rebuild_cuda_tensor.
_DEVICE_ARG = 6


@dataclass(frozen=True)
class IpcPayload:
    """Picklable: the header bytes plus one (rebuild_fn, args) handle per bucket."""
    header: bytes
    handles: tuple[tuple, ...]


@dataclass(frozen=True)
class IpcExport:
    payload: IpcPayload  # send this to the engine process
    buffers: tuple[torch.Tensor, ...]  # keep alive until the engine is done


def export_ipc(named_tensors: Iterable[tuple[str, torch.Tensor]],
               bucket_bytes: int = 512 * 2**20, version: int | None = None,
               device: torch.device | str | int | None = None) -> IpcExport:
    """Pack CUDA tensors into buckets on `device` and export their IPC handles."""
    named = list(named_tensors)
    device = _cuda_device(named, device)
    plan = plan_buckets(named, bucket_bytes)
    tensors = [t.detach() for _, t in named]
    buffers = []
    for i, spec in enumerate(plan.buckets):
        out = torch.empty(spec.numel, dtype=spec.dtype, device=device)
        buffers.append(pack_bucket(plan, i, tensors, out=out))
    header = encode_header(Header(0, version, plan.to_json()))
    handles = tuple(reduce_tensor(b) for b in buffers)
    return IpcExport(IpcPayload(header, handles), tuple(buffers))


def _cuda_device(named: list[tuple[str, torch.Tensor]],
                 device: torch.device | str | int | None) -> torch.device:
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.device.type != "cuda":
            raise ValueError(f"export_ipc needs CUDA tensors; {name!r} is on {t.device}")
    if not torch.cuda.is_available():
        raise ValueError("export_ipc needs CUDA (CUDA IPC handles)")
    if device is None:
        return named[0][1].device if named else torch.device("cuda")
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def rebuild_ipc(payload: IpcPayload, device: int | None = None) -> ReceivedUpdate:
    """Open the handles (in the engine process) and return views onto the buckets.

    `device` overrides the sender's device index, for processes whose
    CUDA_VISIBLE_DEVICES numbers the same GPU differently.
    """
    header = decode_header(payload.header)
    plan = decode_plan(header.plan_json)
    if len(payload.handles) != len(plan.buckets):
        raise ValueError(f"IPC payload has {len(payload.handles)} handles for "
                         f"{len(plan.buckets)} buckets")
    buffers = [_open_handle(fn, args, device) for fn, args in payload.handles]
    return ReceivedUpdate(header.version, unpack_buckets(plan, buffers),
                          len(plan.buckets), plan.total_bytes)


def _open_handle(fn, args: tuple, device: int | None) -> torch.Tensor:
    if device is not None:
        args = args[:_DEVICE_ARG] + (device,) + args[_DEVICE_ARG + 1:]
    return fn(*args)
