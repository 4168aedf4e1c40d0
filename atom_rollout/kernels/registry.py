"""Backend registry: picks aiter -> triton -> torch unless told otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .interface import KernelOps

ENV_VAR = "ATOM_ROLLOUT_KERNEL_BACKEND"
PREFERENCE = ("aiter", "triton", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    is_available: Callable[[torch.device], bool]
    create: Callable[[], KernelOps]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends(device: torch.device) -> list[str]:
    return [name for name in PREFERENCE if name in _BACKENDS
            and _BACKENDS[name].is_available(device)]


def select_backend(device: torch.device | str, requested: str | None = None) -> KernelOps:
    """The engine option wins over the environment variable, which wins over
    the preference order; a requested backend that cannot run is an error."""
    device = torch.device(device)
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is None:
        return _BACKENDS[available_backends(device)[0]].create()
    if requested not in _BACKENDS:
        raise ValueError(f"kernel_backend: unknown backend {requested!r}; "
                         f"known: {sorted(_BACKENDS)}")
    if not _BACKENDS[requested].is_available(device):
        raise ValueError(f"kernel_backend: {requested!r} cannot run on {device} "
                         f"(available: {available_backends(device)})")
    return _BACKENDS[requested].create()
