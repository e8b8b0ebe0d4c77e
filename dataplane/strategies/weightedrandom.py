"""weighted_random: endpoint i with P_i = w_i / Σw, drawn independently per call.

Executor: ``native/src/strategy/weighted_random.rs``.
"""

from dataplane.strategies.strategy import Strategy

STRATEGY = Strategy(name="weighted_random", weighted=True, share="w_i/Σw, independent draws")
