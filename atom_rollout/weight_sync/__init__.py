"""Weight sync transport: trainer -> rollout engine, in flat buckets.

Broadcast over a standalone process group (NCCL/RCCL, Gloo; MoRI where supported) or
CUDA IPC for a trainer and engine sharing one GPU.
"""
from .bucketing import (BucketPlan, BucketSpec, TensorSpec, pack_bucket, pack_buckets,
                        plan_buckets, unpack_bucket, unpack_buckets)
from .errors import WeightSyncError, WeightSyncTimeout
from .ipc import IpcExport, IpcPayload, export_ipc, rebuild_ipc
from .receiver import BucketHook, ReceivedUpdate, WeightReceiver
from .sender import SendStats, WeightSender

__all__ = [
    "BucketHook", "BucketPlan", "BucketSpec", "IpcExport", "IpcPayload", "ReceivedUpdate",
    "SendStats", "TensorSpec", "WeightReceiver", "WeightSender", "WeightSyncError",
    "WeightSyncTimeout", "export_ipc", "pack_bucket", "pack_buckets", "plan_buckets",
    "rebuild_ipc", "unpack_bucket", "unpack_buckets",
]
