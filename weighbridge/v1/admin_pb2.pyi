from weighbridge.v1 import backend_set_pb2 as _backend_set_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListBackendSetsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("endpoint", "eligible", "share", "requests", "errors", "in_flight", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "connected", "last_error", "state", "state_reason", "state_since_unix", "ejections")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    endpoint: _backend_set_pb2.Endpoint
    eligible: bool
    share: float
    requests: int
    errors: int
    in_flight: int
    latency_mean_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    connected: bool
    last_error: str
    state: str
    state_reason: str
    state_since_unix: float
    ejections: int
    def __init__(self, endpoint: _Optional[_Union[_backend_set_pb2.Endpoint, _Mapping]] = ..., eligible: _Optional[bool] = ..., share: _Optional[float] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., in_flight: _Optional[int] = ..., latency_mean_ms: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., connected: _Optional[bool] = ..., last_error: _Optional[str] = ..., state: _Optional[str] = ..., state_reason: _Optional[str] = ..., state_since_unix: _Optional[float] = ..., ejections: _Optional[int] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("backend_set", "mod_revision", "backends")
    BACKEND_SET_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backend_set: _backend_set_pb2.BackendSet
    mod_revision: int
    backends: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, backend_set: _Optional[_Union[_backend_set_pb2.BackendSet, _Mapping]] = ..., mod_revision: _Optional[int] = ..., backends: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...

class ListBackendSetsResponse(_message.Message):
    __slots__ = ("proxy_id", "applied_revision", "etcd_connected", "etcd_last_error", "relists", "services")
    PROXY_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    ETCD_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ETCD_LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    RELISTS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    proxy_id: str
    applied_revision: int
    etcd_connected: bool
    etcd_last_error: str
    relists: int
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, proxy_id: _Optional[str] = ..., applied_revision: _Optional[int] = ..., etcd_connected: _Optional[bool] = ..., etcd_last_error: _Optional[str] = ..., relists: _Optional[int] = ..., services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("authority", "method", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    authority: str
    method: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, authority: _Optional[str] = ..., method: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("service", "matched_by", "strategy", "endpoint", "reason", "error")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_BY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    service: str
    matched_by: str
    strategy: str
    endpoint: _backend_set_pb2.Endpoint
    reason: str
    error: str
    def __init__(self, service: _Optional[str] = ..., matched_by: _Optional[str] = ..., strategy: _Optional[str] = ..., endpoint: _Optional[_Union[_backend_set_pb2.Endpoint, _Mapping]] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
