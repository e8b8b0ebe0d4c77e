"""Weighbridge's exception hierarchy; lower-level errors are wrapped with ``raise … from``."""


class WeighbridgeError(Exception):
    """Base of every error Weighbridge raises on purpose."""


class DecodeError(WeighbridgeError):
    """A stored value is not a valid BackendSet (corrupt, or written by something else)."""


class EtcdUnavailableError(WeighbridgeError):
    """etcd could not be reached or did not answer in time."""
