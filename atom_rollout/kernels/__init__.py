"""Kernel ops behind one interface, with backends chosen at start-up."""
from .interface import KernelOps, unfused_prepare_qkv
from .metadata import AttentionMetadata
from .registry import Backend, available_backends, register_backend, select_backend
from .torch_ops import TorchOps
from . import aiter as _aiter
from . import triton as _triton

register_backend(Backend("torch", lambda device: True, TorchOps))
register_backend(Backend("triton", _triton.is_available, _triton.TritonOps))
register_backend(Backend("aiter", _aiter.is_available, _aiter.AiterOps))

__all__ = ["AttentionMetadata", "Backend", "KernelOps", "TorchOps", "available_backends",
           "register_backend", "select_backend", "unfused_prepare_qkv"]
