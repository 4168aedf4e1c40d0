"""Errors raised by the weight-sync transport."""


class WeightSyncError(RuntimeError):
    """A weight update could not be sent or received (peer died, timeout, bad header)."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A deadline passed before the update (or its start) arrived."""
