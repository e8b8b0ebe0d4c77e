"""How long the engine takes to apply one large backend set, per strategy: the cost a set
update puts on the proxy's event loop (the engine builds the picker while Python waits).

    .venv/bin/python -m bench.apply_time [--endpoints 5000] [--max-weight 1000000] [--rounds 7]

Each round applies a fresh set of N endpoints with random weights from 1 to max-weight to a
real engine (its endpoints at documentation-range addresses, connections lazy: nothing is
dialled) and times the call; medians and maxima over the rounds. Bounded: fixed counts.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import time

from dataplane.engine import NativeEngine
from dataplane.settings import ProxySettings
from dataplane.strategies import configure
from weighbridge.keys import ServiceKey
from weighbridge.model import STRATEGIES, BackendSet, Endpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoints", type=int, default=5000)
    p.add_argument("--max-weight", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    rng = random.Random(1)
    rows = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        engine = NativeEngine(sock, ProxySettings(threads=1, eager_connections=False), seed=1)
        try:
            for strategy in STRATEGIES:
                times = []
                for r in range(args.rounds):
                    endpoints = tuple(
                        Endpoint(
                            f"192.0.2.{i % 250 + 1}",
                            10000 + i // 250,
                            weight=rng.randint(1, args.max_weight),
                        )
                        for i in range(args.endpoints)
                    )
                    route = configure(BackendSet("bench", f"s{r}", strategy, endpoints))
                    began = time.perf_counter()
                    engine.apply(ServiceKey(f"bench/s{r}"), route)
                    times.append(time.perf_counter() - began)
                    engine.remove(ServiceKey(f"bench/s{r}"))
                rows.append((strategy, statistics.median(times), max(times)))
        finally:
            engine.close()
    print(
        f"Applying one set of {args.endpoints} endpoints, random weights 1 to {args.max_weight}, "
        f"{args.rounds} rounds:\n"
    )
    print("| strategy | median ms | max ms |\n|---|---|---|")
    for strategy, median, worst in rows:
        print(f"| {strategy} | {median * 1e3:.2f} | {worst * 1e3:.2f} |")


if __name__ == "__main__":
    main()
