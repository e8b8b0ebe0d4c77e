"""least_request: the power of two choices on calls in flight, weight-aware (Envoy's).

Two distinct endpoints are drawn with P_i = w_i/Σw; the call goes to the one with fewer calls
in flight per unit of weight (in_flight/w; a tie goes to the first drawn). At equal load per
weight the shares are w_i/Σw; a slower endpoint holds its calls longer and is chosen less.
Executor: ``native/src/strategy/least_request.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(
    name="least_request",
    weighted=True,
    share="w_i/Σw at equal load; fewer calls to an endpoint with more in flight per weight",
)
