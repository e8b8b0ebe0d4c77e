"""Weighbridge's data path in Rust (native/src): HTTP/2 forwarding, routing, per-request picks."""

STRATEGIES: list[str]

class ClientLimits:
    def __init__(
        self,
        *,
        handshake_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        max_concurrent_streams: int,
        max_header_list_size: int,
        keepalive_time_s: float,
        keepalive_timeout_s: float,
        backend_stream_wait_s: float,
    ) -> None: ...

class Engine:
    def __init__(
        self,
        fd: int,
        *,
        threads: int,
        max_message_bytes: int,
        eager: bool,
        latency_bounds_ns: list[int],
        max_connection_age_s: float,
        max_backend_connections: int,
        handshake_timeout_s: float,
        keepalive_time_s: float,
        keepalive_timeout_s: float,
        retry_buffer_bytes: int,
        limits: ClientLimits,
        tls: tuple[str, str, str, list[str], bool, float] | None = None,
        seed: int | None = None,
        zone: str = "",
        node: str = "",
    ) -> None: ...
    @property
    def threads(self) -> int: ...
    def apply(
        self,
        key: str,
        strategy: str,
        endpoints: list[tuple[str, str, int]],
        total: int,
        *,
        retry: tuple[list[int], int, float, float, float, float, float] | None,
        outlier: tuple[int, float, float, int] | None,
        health_check: tuple[str, float, float, int, int] | None,
        panic_threshold: int,
        stream_idle_timeout_s: float,
        debug: tuple[bool, bool],
        slow_start: tuple[float, float, int] | None = None,
        hash: tuple[str, int] | None = None,
        tls: tuple[str, str, str, str] | None = None,
        zone_aware: tuple[bool, int, bool] | None = None,
        places: list[tuple[str, list[str], list[str]]] | None = None,
        generation: int = 0,
        revision: int = 0,
    ) -> None: ...
    def set_proxy_zones(self, proxies: dict[str, int]) -> None: ...
    def zone_plan(self, key: str) -> str | None: ...
    def remove(self, key: str) -> None: ...
    def set_grpc_services(self, table: dict[str, str]) -> None: ...
    def route(self, authority: str, path: str) -> tuple[str, str]: ...
    def explain(self, key: str, headers: dict[str, str] | None = None) -> tuple[str, str]: ...
    def simulate(self, key: str, calls: int) -> list[tuple[str, int]]: ...
    def stats(
        self, key: str | None = None
    ) -> list[
        tuple[str, str, int, int, int, float, list[int], bool, str, tuple[str, str, float, int]]
    ]: ...
    def counters(self) -> tuple[int, int, list[tuple[str, int]]]: ...
    def failover_counters(self) -> list[tuple[str, str, int]]: ...
    def events(self) -> list[tuple[float, str, str, str, str]]: ...
    @property
    def events_dropped(self) -> int: ...
    def tls_failures(self) -> list[tuple[str, int]]: ...
    def client_limits(self) -> list[tuple[str, int]]: ...
    @property
    def client_connections(self) -> int: ...
    def thread_counters(self) -> list[tuple[int, int, int]]: ...
    def goaway(self) -> None: ...
    def close(self) -> None: ...
