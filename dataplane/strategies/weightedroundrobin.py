"""weighted_round_robin: nginx's smooth weighted round robin, P_i = w_i / Σw.

Any Σw consecutive calls (after reducing the weights by their gcd) reach endpoint i exactly
w_i times, interleaved rather than in bursts; equal weights are a plain rotation. Executor:
``native/src/strategy/weighted_round_robin.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(
    name="weighted_round_robin", weighted=True, share="w_i/Σw, smoothly interleaved"
)
