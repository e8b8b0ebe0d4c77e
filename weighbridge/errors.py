"""Weighbridge's exception hierarchy; lower-level errors are wrapped with ``raise … from``."""


class WeighbridgeError(Exception):
    """Base of every error Weighbridge raises on purpose."""


class DecodeError(WeighbridgeError):
    """A stored value is not a valid BackendSet (corrupt, or written by something else)."""


class EtcdUnavailableError(WeighbridgeError):
    """etcd could not be reached or did not answer in time."""


class EtcdPermissionDeniedError(EtcdUnavailableError):
    """etcd refused a request: the client certificate's user (its CN) lacks a role for the key.

    A subclass of :class:`EtcdUnavailableError` so every loop that retries an unreachable
    etcd also retries this one (it heals when the roles are fixed); its message names the fix.
    """


class EtcdCredentialsError(EtcdUnavailableError):
    """A TLS file for etcd (--etcd-cacert, --etcd-cert, --etcd-key) cannot be read or is not PEM.

    At start-up it is fatal; at a reconnect it is retried like an unreachable etcd, since a
    mounted Secret may be between two versions.
    """
