from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "weight", "zone", "pod", "node", "serving", "terminating", "hint_zones", "hint_nodes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    TERMINATING_FIELD_NUMBER: _ClassVar[int]
    HINT_ZONES_FIELD_NUMBER: _ClassVar[int]
    HINT_NODES_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    weight: int
    zone: str
    pod: str
    node: str
    serving: bool
    terminating: bool
    hint_zones: _containers.RepeatedScalarFieldContainer[str]
    hint_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., weight: _Optional[int] = ..., zone: _Optional[str] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ..., serving: _Optional[bool] = ..., terminating: _Optional[bool] = ..., hint_zones: _Optional[_Iterable[str]] = ..., hint_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class BackendSet(_message.Message):
    __slots__ = ("namespace", "name", "strategy", "endpoints", "generation", "options", "grpc_services", "source", "built_unix_nanos")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BUILT_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    strategy: str
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    generation: int
    options: _containers.ScalarMap[str, str]
    grpc_services: _containers.RepeatedScalarFieldContainer[str]
    source: str
    built_unix_nanos: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., strategy: _Optional[str] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., generation: _Optional[int] = ..., options: _Optional[_Mapping[str, str]] = ..., grpc_services: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., built_unix_nanos: _Optional[int] = ...) -> None: ...

class ProxyStatus(_message.Message):
    __slots__ = ("id", "applied_revision", "updated_unix_nanos", "backend_sets", "zone")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_SETS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    id: str
    applied_revision: int
    updated_unix_nanos: int
    backend_sets: int
    zone: str
    def __init__(self, id: _Optional[str] = ..., applied_revision: _Optional[int] = ..., updated_unix_nanos: _Optional[int] = ..., backend_sets: _Optional[int] = ..., zone: _Optional[str] = ...) -> None: ...
