"""random: a uniform draw among the eligible endpoints per call, P_i = 1/N.

Executor: ``native/src/strategy/random.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(name="random", weighted=False, share="1/N, uniform draw")
