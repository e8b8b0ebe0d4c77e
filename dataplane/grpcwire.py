"""The few pieces of the gRPC-over-HTTP/2 wire format the proxy needs (no payload parsing)."""

from __future__ import annotations

import urllib.parse
from typing import Final

CODES: Final = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
_TIMEOUT_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (e.g. ``b"250m"``) in seconds; None when malformed."""
    if len(value) < 2 or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def error_headers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    """A Trailers-Only response: HTTP 200 with the gRPC status in the only HEADERS frame."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        *error_trailers(code, message),
    ]


def error_trailers(code: int, message: str) -> list[tuple[bytes, bytes]]:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2 spec).
    encoded = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()
    return [(b"grpc-status", str(code).encode()), (b"grpc-message", encoded)]


class MessageMeter:
    """Follows gRPC length-prefixed message boundaries in a byte stream, without copying,
    to enforce a maximum message size."""

    __slots__ = ("_header", "_remaining", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._remaining = 0  # payload bytes left in the current message
        self._header = b""  # partial 5-byte prefix

    def feed(self, data: bytes | memoryview) -> int | None:
        """Consume ``data``; returns the size of a message over the limit, else None."""
        pos, n = 0, len(data)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                self._remaining -= take
                pos += take
                continue
            need = 5 - len(self._header)
            self._header += bytes(data[pos : pos + need])
            pos += need
            if len(self._header) == 5:
                size = int.from_bytes(self._header[1:5], "big")
                self._header = b""
                if size > self.limit:
                    return size
                self._remaining = size
        return None
