"""A stateless, caching HPACK encoder for the proxy's outbound header blocks.

hpack's encoder was a fifth of the proxy's CPU per call (docs/performance.md): each call
encodes four header lists (request and response headers, trailers, on two connections), and
most are the same every time. This encoder never adds entries to the HPACK dynamic table
(RFC 7541 §6.2.2 "literal without indexing", static-table indices where they exist), so one
header list always encodes to the same bytes, and those bytes are cached process-wide.

The first block on each connection starts with a dynamic table size update to 0, telling the
peer's decoder that this encoder uses no dynamic table. Header fields h2 marks never-indexed,
and credentials, keep the never-indexed representation and are never cached, nor are header
lists with a per-call ``grpc-timeout``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

_FULL: Final[dict[tuple[bytes, bytes], int]] = {}
_NAME: Final[dict[bytes, int]] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _FULL.setdefault((_n, _v), _i)
    _NAME.setdefault(_n, _i)

SENSITIVE: Final = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
UNCACHED: Final = frozenset({b"grpc-timeout"}) | SENSITIVE
CACHE_SIZE: Final = 4096

_cache: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(s: bytes) -> bytes:
    return _integer(len(s), 7, 0) + s


def encode_block(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """The header block, and whether it may be cached."""
    out = bytearray()
    cacheable = True
    for header in headers:
        name, value = header[0], header[1]
        never = isinstance(header, NeverIndexedHeaderTuple) or name in SENSITIVE
        if name in UNCACHED or never:
            cacheable = False
        if not never:
            full = _FULL.get((name, value))
            if full is not None:
                out += _integer(full, 7, 0x80)
                continue
        flags = 0x10 if never else 0x00
        index = _NAME.get(name)
        if index is not None:
            out += _integer(index, 4, flags)
        else:
            out.append(flags)
            out += _string(name)
        out += _string(value)
    return bytes(out), cacheable


class StatelessEncoder:
    """Drop-in for ``hpack.Encoder`` as h2 uses it (``encode`` and ``header_table_size``)."""

    __slots__ = ("_announced", "header_table_size")

    def __init__(self) -> None:
        self.header_table_size = 4096  # h2 sets this from the peer's SETTINGS; we use none of it
        self._announced = False

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        key = headers if isinstance(headers, tuple) else tuple(headers)
        block = _cache.get(key)
        if block is None:
            block, cacheable = encode_block(key)
            if cacheable:
                if len(_cache) >= CACHE_SIZE:
                    _cache.clear()
                _cache[key] = block
        if not self._announced:
            self._announced = True
            return b"\x20" + block  # dynamic table size update: 0
        return block
