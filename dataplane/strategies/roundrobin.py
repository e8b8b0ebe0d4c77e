"""round_robin: strict rotation over the eligible endpoints from a random start, P_i = 1/N.

Every N consecutive calls reach each endpoint once, whichever engine thread carries them (the
rotation is one per process). Executor: ``native/src/strategy/round_robin.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(name="round_robin", weighted=False, share="1/N, strict rotation")
