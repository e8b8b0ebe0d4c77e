"""ring_hash: consistent hashing of a request header, with bounded loads.

Each endpoint holds points on a ring in proportion to its weight, placed by its HOST:PORT, so a
key keeps its endpoint while the set changes (only a leaving endpoint's keys move). A call goes
to the first endpoint clockwise from its key's hash whose calls in flight stay within
c x (all in flight + 1) x w_i/Σw (c: the ``bound`` of ``weighbridge.io/hash``); a call
without the header is a weighted random draw. Executor: ``native/src/strategy/ring_hash.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(
    name="ring_hash",
    weighted=True,
    share="w_i/Σw of the keys; a key keeps its endpoint while it is within its load bound",
)
