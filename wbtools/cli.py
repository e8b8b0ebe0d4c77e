"""The ``wbctl`` command: :mod:`weighbridge.wbctl`'s commands, and ``simulate`` and ``spread``.

wbctl simulate NAMESPACE/NAME [--annotations FILE|-] [--calls N] [-o table|json]
wbctl spread NAMESPACE/NAME [--admin HOST:PORT ...] [--interval SECONDS] [-o table|json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from controlplane.errors import AnnotationError
from weighbridge import wbctl
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import parse_service_key

DEFAULT_CALLS = 10_000
"""Picks ``simulate`` has the engine make by default: enough for a random strategy's shares to
within about 1%."""


def add_commands(sub: wbctl.Subcommands) -> None:
    simulate = sub.add_parser(
        "simulate",
        help="the set the controller would publish for a Service (with the annotations you "
        "give) and how the proxy's engine would spread calls over it; writes nothing",
    )
    simulate.add_argument("service", metavar="NAMESPACE/NAME")
    simulate.add_argument(
        "--annotations",
        metavar="FILE",
        help="YAML or JSON map of annotation: value, replacing or adding to the Service's own "
        "(null removes one); - reads standard input",
    )
    simulate.add_argument(
        "--calls",
        type=int,
        default=DEFAULT_CALLS,
        metavar="N",
        help="picks the engine makes (default %(default)s; 0: expected shares only)",
    )
    simulate.add_argument(
        "--seed", type=int, default=None, help="where rotations start (default: random)"
    )
    simulate.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig path (default: $KUBECONFIG or ~/.kube/config; in a pod, its "
        "service account)",
    )
    simulate.add_argument("--context", default=None, help="kubeconfig context (default: current)")
    simulate.add_argument(
        "--source",
        choices=("endpointslices", "endpoints"),
        default="endpointslices",
        help="where endpoints come from, as the controller's --source (default %(default)s)",
    )
    simulate.add_argument("-o", "--output", choices=("table", "json"), default="table")

    spread = sub.add_parser(
        "spread",
        help="how the live proxies spread a Service's calls (their counters, from their admin "
        "APIs) against the shares its set promises",
    )
    spread.add_argument("service", metavar="NAMESPACE/NAME")
    spread.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a proxy's admin API, e.g. through kubectl -n weighbridge port-forward "
        f"pod/PROXY-POD 9501; repeat for each proxy (default {wbctl.DEFAULT_ADMIN})",
    )
    spread.add_argument(
        "--interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="count only the calls made in this many seconds from now (default 0: every call "
        "since each endpoint joined the proxy)",
    )
    spread.add_argument("-o", "--output", choices=("table", "json"), default="table")


# simulate and spread import their modules when they run: those load the controller's code,
# the engine and the Kubernetes client, which no other command needs to start.


def read_overrides(path: str | None) -> dict[str, str | None]:
    """The annotations of ``--annotations`` (a file, or ``-``: standard input)."""
    from wbtools import simulating

    if path is None:
        return {}
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    return simulating.parse_overrides(text, name="stdin" if path == "-" else path)


async def run_simulate(args: argparse.Namespace, out: TextIO) -> int:
    from controlplane.kube import Kube
    from wbtools import simulating

    if args.calls < 0:
        raise ValueError("--calls must be 0 or more")
    key = parse_service_key(args.service)
    overrides = read_overrides(args.annotations)
    kube = await Kube.connect(args.kubeconfig, args.context)
    try:
        live = await simulating.read_live(kube, key, source=args.source)
    finally:
        await kube.close()
    try:
        sim = simulating.simulate(live, overrides, calls=args.calls, seed=args.seed)
    except AnnotationError as exc:
        raise WeighbridgeError(
            f"the controller would refuse these annotations and keep the Service's last good "
            f"set (Warning Event {exc.reason}): {exc.message}"
        ) from None
    if args.output == "json":
        simulating.write_json(sim, out)
    else:
        simulating.print_simulation(sim, out)
    return 0


async def run_spread(args: argparse.Namespace, out: TextIO) -> int:
    from wbtools import spreading

    if args.interval < 0:
        raise ValueError("--interval must be 0 or more")
    key = parse_service_key(args.service)
    admins = list(dict.fromkeys(args.admin)) or [wbctl.DEFAULT_ADMIN]
    spread = await spreading.measure(key, admins, interval=args.interval)
    if args.output == "json":
        spreading.write_json(spread, out)
    else:
        spreading.print_spread(spread, out)
    return 0


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "simulate":
        return await run_simulate(args, out)
    if args.command == "spread":
        return await run_spread(args, out)
    return await wbctl.run(args, out)


def main(argv: Sequence[str] | None = None) -> None:
    args = wbctl.build_parser(add_commands).parse_args(argv)
    sys.exit(wbctl.execute(run(args, sys.stdout)))


if __name__ == "__main__":
    main()
