"""The stateless HPACK encoder round-trips through hpack's real decoder, cached or not."""

from __future__ import annotations

from hpack import Decoder
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from dataplane.hpackcache import StatelessEncoder, _cache

names = st.sampled_from(
    [
        b":status",
        b"content-type",
        b"grpc-status",
        b"grpc-message",
        b"x-custom",
        b"authorization",
        b"grpc-timeout",
        b"x-long-" + b"n" * 200,
    ]
)
values = st.binary(min_size=0, max_size=300).filter(lambda v: b"\n" not in v)


@given(st.lists(st.lists(st.tuples(names, values), max_size=8), min_size=1, max_size=5))
def test_blocks_decode_to_the_same_headers(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    encoder, decoder = StatelessEncoder(), Decoder()
    for headers in blocks + blocks:  # the second round comes from the cache
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
    assert len(decoder.header_table.dynamic_entries) == 0, "never touches the dynamic table"


def test_never_indexed_and_sensitive_fields_stay_out_of_the_cache() -> None:
    _cache.clear()
    encoder, decoder = StatelessEncoder(), Decoder()
    headers = [
        (b":status", b"200"),
        NeverIndexedHeaderTuple(b"x-secret", b"s"),
        (b"authorization", b"Bearer t"),
    ]
    decoded = decoder.decode(encoder.encode(headers), raw=True)
    assert decoded == headers
    assert all(isinstance(h, NeverIndexedHeaderTuple) for h in decoded[1:])
    assert not _cache
    common = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    encoder.encode(common)
    assert tuple(common) in _cache
