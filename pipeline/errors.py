"""The streamrec exception tree.

    StreamrecError
    ├── ConfigError          a setting is invalid; raised at start, names the setting
    ├── InvalidMessage       a consumed message failed decoding/validation (becomes a DLQ record)
    ├── BrokerError          the broker cannot be started, reached or administered
    ├── StateError           a state snapshot cannot be written or read
    │   └── OwnershipLost    another instance took the partition over: stop writing its state
    ├── RegistryError        the model registry is missing, corrupt or refuses a version
    │   └── ModelRejected    a model file is unsafe or inconsistent (pickle, NaN, wrong shape)
    ├── DatasetError         a dataset cannot be obtained or parsed
    └── TrainingStopped      a fine-tune run was abandoned because its worker is stopping

Bad input is data (InvalidMessage never escapes the consumer loop); broken infrastructure raises.
tests/pipeline/test_errors.py pins this drawing to the classes.
"""

from __future__ import annotations

__all__ = [
    "StreamrecError",
    "ConfigError",
    "InvalidMessage",
    "BrokerError",
    "StateError",
    "OwnershipLost",
    "RegistryError",
    "ModelRejected",
    "DatasetError",
    "TrainingStopped",
]


class StreamrecError(Exception):
    """Base of every error streamrec raises on purpose."""


class ConfigError(StreamrecError):
    """A setting is invalid; the message names it."""


class InvalidMessage(StreamrecError):
    """A message that must go to the DLQ. `reason` is a short machine-readable class
    (metric label), `field` the failing field when known, `detail` a human sentence."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.field = field
        super().__init__(f"{reason}: {detail}")


class BrokerError(StreamrecError):
    """The broker cannot be started, reached or administered."""


class StateError(StreamrecError):
    """A state snapshot cannot be written or restored."""


class OwnershipLost(StateError):
    """Another instance took this partition over; this one must not write its state."""


class RegistryError(StreamrecError):
    """The model registry is missing, corrupt, or has no such version."""


class ModelRejected(RegistryError):
    """A model version is unsafe or inconsistent and must not be loaded."""


class DatasetError(StreamrecError):
    """A dataset cannot be obtained or parsed."""


class TrainingStopped(StreamrecError):
    """A fine-tune run was abandoned because its worker is stopping (nothing was published)."""
