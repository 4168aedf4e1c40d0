"""The engine's end of a trainer's weight broadcast: the receiver of the standalone group
and the streamed writer that puts each landed bucket into the model (it caches the bucket
layout and uses the receiver's buffers, so the two live and die together)."""
from __future__ import annotations

import torch

from ..models import WeightMap
from ..weight_sync import ReceivedUpdate, WeightReceiver
from .streamed_update import StreamedUpdate


class WeightBroadcast:
    def __init__(self, weight_map: WeightMap, parameters: list[torch.nn.Parameter],
                 engine_device: torch.device) -> None:
        self.weight_map, self.engine_device = weight_map, engine_device
        self._parameters = parameters  # the model's; .to() keeps these objects
        self.receiver: WeightReceiver | None = None
        self._streamed: StreamedUpdate | None = None

    def join(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
             backend: str, timeout_s: float) -> None:
        """Join the trainer's group as rank ``rank_offset`` (blocks until all joined)."""
        self.close()
        device = self.engine_device if backend == "nccl" else torch.device("cpu")
        self.receiver = WeightReceiver(master_address, master_port, rank_offset, world_size,
                                       backend=backend, device=device, timeout_s=timeout_s)

    def receive(self, timeout_s: float | None) -> ReceivedUpdate:
        """One whole update into the receiver's buffers; touches no engine state."""
        return self._joined().receive(timeout_s)

    def can_stream(self) -> bool:
        """Buckets can be written as they land when the weights sit where they arrive
        (not, e.g., while asleep with the weights offloaded to the host)."""
        device = self._joined().device
        return all(p.device == device for p in self._parameters)

    def receive_into_model(self, timeout_s: float | None, partial: bool,
                           check_finite: bool) -> int | None:
        """Write each bucket into the model as it lands (see streamed_update.py); any
        failure puts the old weights back and raises. Returns the update's version."""
        receiver = self._joined()
        streamed = self._streamed = self._streamed or StreamedUpdate(self.weight_map)
        check_plan = streamed.begin(partial, check_finite)
        try:
            received = receiver.receive(timeout_s, on_bucket=streamed.apply_bucket,
                                        on_plan=check_plan)
            streamed.commit()
        except BaseException:
            streamed.rollback()
            raise
        return received.version

    def release_scratch(self) -> None:
        """Drop the writer (its scratch buffer); it is rebuilt on the next update."""
        self._streamed = None

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        self._streamed = None  # it may reference the old receiver's buffers

    def _joined(self) -> WeightReceiver:
        if self.receiver is None:
            raise RuntimeError("receive_weights: call init_weight_sync first")
        return self.receiver
