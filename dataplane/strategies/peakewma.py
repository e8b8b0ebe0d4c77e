"""peak_ewma: the power of two choices on latency times load, as Linkerd and Finagle balance.

Each endpoint keeps a peak-sensitive EWMA of its time to response headers (τ = 10 s; a slower
sample replaces the average at once, and without samples it decays towards 0 so an endpoint
avoided while slow is tried again). Two distinct endpoints are drawn with P_i = w_i/Σw; the
call goes to the one with the lower ewma * (1 + in_flight/w). Executor:
``native/src/strategy/peak_ewma.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(
    name="peak_ewma",
    weighted=True,
    share="w_i/Σw at equal latency and load; fewer calls to a slower or busier endpoint",
)
