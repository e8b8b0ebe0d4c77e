"""Weighbridge's shared wire contract: the backend-set model, its codec, the etcd key scheme
and logging setup. Imported by both planes; imports neither."""

from weighbridge.errors import DecodeError, WeighbridgeError
from weighbridge.keys import DEFAULT_PREFIX, KeyScheme, ServiceKey
from weighbridge.model import STRATEGIES, BackendSet, Endpoint, decode, encode

__all__ = [
    "DEFAULT_PREFIX",
    "STRATEGIES",
    "BackendSet",
    "DecodeError",
    "Endpoint",
    "KeyScheme",
    "ServiceKey",
    "WeighbridgeError",
    "decode",
    "encode",
]
