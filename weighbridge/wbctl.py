"""wbctl — read and write Weighbridge backend sets in etcd, and ask a proxy how its backends are.

    wbctl get [NAMESPACE/NAME] [-o table|json]
    wbctl put NAMESPACE/NAME --strategy S --endpoint HOST:PORT[=WEIGHT] ... [--option KEY=TEXT]
    wbctl delete NAMESPACE/NAME
    wbctl proxies [-o table|json]
    wbctl backends [NAMESPACE/NAME] [--admin HOST:PORT] [-o table|json]

``put`` writes a set by hand: for running proxies without Kubernetes, and for tests. While
a controller manages the same Service it will overwrite the hand-written set on its next sync.
``backends`` asks one proxy's admin API (not etcd) for each endpoint's state and counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO, TypeAlias

import aetcd
import grpc

from weighbridge import etcd as store
from weighbridge import etcdauth
from weighbridge.cli import add_etcd_arguments, etcd_tls
from weighbridge.errors import WeighbridgeError
from weighbridge.keys import KeyScheme, parse_service_key
from weighbridge.model import STRATEGIES, BackendSet, Endpoint
from weighbridge.policy import OPTION_KEYS, canonical_option
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_ADMIN = "127.0.0.1:9501"
"""A proxy's admin API as ``kubectl port-forward`` brings it to this machine."""


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT[=WEIGHT]``; IPv6 hosts in brackets: ``[::1]:50051=3``."""
    hostport, _, weight = text.partition("=")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {text!r} is not HOST:PORT[=WEIGHT]")
    if weight and not weight.isdigit():
        raise ValueError(f"endpoint {text!r}: weight must be a whole number >= 0")
    return Endpoint(address=host.strip("[]"), port=int(port), weight=int(weight or 1))


def parse_option(text: str) -> tuple[str, str]:
    """``KEY=TEXT``: a failover policy (``retry``, ``outlier-detection``, ``health-check``,
    ``panic-threshold``) as its annotation would say it → (key, canonical text)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in OPTION_KEYS:
        raise ValueError(
            f"option {text!r} is not KEY=TEXT with KEY one of {', '.join(OPTION_KEYS)}"
        )
    try:
        return key, canonical_option(key, value)
    except ValueError as exc:
        raise ValueError(f"option {key}: {exc}") from None


def set_to_json(stored: store.StoredSet) -> dict[str, Any]:
    if stored.backend_set is None:
        return {
            "service": stored.key,
            "modRevision": stored.mod_revision,
            "error": str(stored.error),
        }
    bs = stored.backend_set
    probabilities = bs.probabilities()
    return {
        "service": bs.key,
        "strategy": bs.strategy,
        "generation": bs.generation,
        "modRevision": stored.mod_revision,
        "source": bs.source,
        "grpcServices": list(bs.grpc_services),
        "options": dict(bs.options),
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "weight": e.weight,
                "share": float(probabilities.get(e.hostport, 0)),
                "zone": e.zone,
                "pod": e.pod,
                "node": e.node,
                "serving": e.serving,
                "terminating": e.terminating,
            }
            for e in bs.endpoints
        ],
    }


def write_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Left-aligned columns, two spaces apart, as kubectl prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def print_table(sets: Sequence[store.StoredSet], out: TextIO) -> None:
    rows = [("SERVICE", "STRATEGY", "GEN", "ENDPOINTS", "ELIGIBLE", "REVISION", "SOURCE")]
    for s in sets:
        if s.backend_set is None:
            rows.append((s.key, "<invalid>", "-", "-", "-", str(s.mod_revision), str(s.error)))
            continue
        bs = s.backend_set
        rows.append(
            (
                bs.key,
                bs.strategy,
                str(bs.generation),
                str(len(bs.endpoints)),
                str(len(bs.eligible)),
                str(s.mod_revision),
                bs.source,
            )
        )
    write_table(rows, out)


def print_endpoints(stored: store.StoredSet, out: TextIO) -> None:
    print_table([stored], out)
    if stored.backend_set is None:
        return
    out.write("\n")
    probabilities = stored.backend_set.probabilities()
    rows = [("ENDPOINT", "WEIGHT", "SHARE", "SERVING", "TERMINATING", "ZONE", "POD")]
    for e in stored.backend_set.endpoints:
        share = probabilities.get(e.hostport)
        rows.append(
            (
                e.hostport,
                str(e.weight),
                f"{float(share):.2%}" if share else "-",
                str(e.serving).lower(),
                str(e.terminating).lower(),
                e.zone or "-",
                e.pod or "-",
            )
        )
    write_table(rows, out)


async def show_proxies(etcd: aetcd.Client, scheme: KeyScheme, output: str, out: TextIO) -> int:
    """Each proxy's lease-bound status key against the newest revision of the sets."""
    statuses, latest = await store.list_proxy_statuses(etcd, scheme)
    if output == "json":
        doc = {
            "setsRevision": latest,
            "proxies": [
                {
                    "id": s.id,
                    "appliedRevision": s.applied_revision,
                    "backendSets": s.backend_sets,
                    "inSync": s.applied_revision >= latest,
                    "updatedUnixNanos": s.updated_unix_nanos,
                }
                for s in statuses
            ],
        }
        out.write(json.dumps(doc, indent=2) + "\n")
        return 0
    rows = [("PROXY", "APPLIED", "SETS", "IN SYNC", "LAST REPORT")]
    now = time.time_ns()
    for s in statuses:
        age = f"{(now - s.updated_unix_nanos) / 1e9:.0f}s ago"
        sync = "yes" if s.applied_revision >= latest else f"no (sets at {latest})"
        rows.append((s.id, str(s.applied_revision), str(s.backend_sets), sync, age))
    write_table(rows, out)
    return 0


def ago(seconds: float) -> str:
    """A human's "how long ago": 45s, 12m, 3h, 2d."""
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def backends_to_json(response: admin_pb2.ListBackendSetsResponse) -> dict[str, Any]:
    return {
        "proxyId": response.proxy_id,
        "appliedRevision": response.applied_revision,
        "services": [
            {
                "service": f"{s.backend_set.namespace}/{s.backend_set.name}",
                "strategy": s.backend_set.strategy,
                "modRevision": s.mod_revision,
                "endpoints": [
                    {
                        "address": b.endpoint.address,
                        "port": b.endpoint.port,
                        "pod": b.endpoint.pod,
                        "eligible": b.eligible,
                        "share": b.share,
                        "state": b.state,
                        "stateReason": b.state_reason,
                        "stateSinceUnix": b.state_since_unix,
                        "ejections": b.ejections,
                        "requests": b.requests,
                        "errors": b.errors,
                        "inFlight": b.in_flight,
                        "connected": b.connected,
                        "lastError": b.last_error,
                    }
                    for b in s.backends
                ],
            }
            for s in response.services
        ],
    }


def print_backends(
    response: admin_pb2.ListBackendSetsResponse, out: TextIO, *, now: float | None = None
) -> None:
    """One row per endpoint of every Service the proxy applied, with its state and why."""
    now = time.time() if now is None else now
    out.write(f"proxy {response.proxy_id}, applied revision {response.applied_revision}\n\n")
    header = "SERVICE ENDPOINT POD SHARE STATE SINCE EJECTIONS REQUESTS ERRORS REASON"
    rows = [tuple(header.split())]
    for s in response.services:
        key = f"{s.backend_set.namespace}/{s.backend_set.name}"
        for b in s.backends:
            e = b.endpoint
            host = f"[{e.address}]" if ":" in e.address else e.address
            rows.append(
                (
                    key,
                    f"{host}:{e.port}",
                    e.pod or "-",
                    f"{b.share:.2%}" if b.share else "-",
                    b.state or "-",
                    ago(now - b.state_since_unix) if b.state_since_unix else "-",
                    str(b.ejections),
                    str(b.requests),
                    str(b.errors),
                    b.state_reason or "-",
                )
            )
    write_table(rows, out)


async def list_backend_sets(admin: str, service: str | None) -> admin_pb2.ListBackendSetsResponse:
    """One proxy's applied sets (``service``'s only, when given) with each endpoint's state and
    counters, from its admin API at ``admin``; raises WeighbridgeError saying what went wrong
    (the proxy has no set for ``service``, or could not be asked)."""
    request = admin_pb2.ListBackendSetsRequest(service=service or "")
    async with grpc.aio.insecure_channel(admin) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        try:
            response: admin_pb2.ListBackendSetsResponse = await stub.ListBackendSets(
                request, timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise WeighbridgeError(f"{exc.details()} (proxy admin API at {admin})") from None
            raise WeighbridgeError(
                f"the proxy admin API at {admin} answered {exc.code().name}: {exc.details()} "
                "(is a port-forward to the proxy's admin port running?)"
            ) from None
    return response


async def show_backends(admin: str, service: str | None, output: str, out: TextIO) -> int:
    """Each endpoint's state and counters, as one proxy's admin API reports them."""
    response = await list_backend_sets(admin, service)
    if output == "json":
        out.write(json.dumps(backends_to_json(response), indent=2) + "\n")
    else:
        print_backends(response, out)
    return 0


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "backends":
        service = parse_service_key(args.service) if args.service else None
        return await show_backends(args.admin, service, args.output, out)
    scheme = KeyScheme(args.prefix)
    etcd = store.client(args.etcd, tls=etcd_tls(args))
    try:
        if args.command == "get":
            if args.service:
                found = await store.get_set(etcd, scheme, parse_service_key(args.service))
                if found is None:
                    sys.stderr.write(f"wbctl: no backend set for {args.service}\n")
                    return 1
                if args.output == "json":
                    out.write(json.dumps(set_to_json(found), indent=2) + "\n")
                else:
                    print_endpoints(found, out)
                return 0
            revision, sets = await store.list_sets(etcd, scheme)
            if args.output == "json":
                doc = {"revision": revision, "items": [set_to_json(s) for s in sets]}
                out.write(json.dumps(doc, indent=2) + "\n")
            else:
                print_table(sets, out)
            return 0
        if args.command == "put":
            key = parse_service_key(args.service)
            namespace, name = key.split("/")
            previous = await store.get_set(etcd, scheme, key)
            generation = 1
            if previous is not None and previous.backend_set is not None:
                generation = previous.backend_set.generation + 1
            backend_set = BackendSet(
                namespace=namespace,
                name=name,
                strategy=args.strategy,
                endpoints=tuple(parse_endpoint(e) for e in args.endpoint),
                generation=generation,
                options=dict(parse_option(o) for o in args.option),
                grpc_services=tuple(args.grpc_service),
                source="wbctl",
                built_unix_nanos=time.time_ns(),
            )
            revision = await store.put_set(etcd, scheme, backend_set)
            out.write(f"{key}: generation {generation} written at revision {revision}\n")
            return 0
        if args.command == "delete":
            key = parse_service_key(args.service)
            if not await store.delete_set(etcd, scheme, key):
                sys.stderr.write(f"wbctl: no backend set for {key}\n")
                return 1
            out.write(f"{key}: deleted\n")
            return 0
        if args.command == "proxies":
            return await show_proxies(etcd, scheme, args.output, out)
        if args.command == "etcd-auth":
            for line in await etcdauth.setup(etcd, scheme):
                out.write(line + "\n")
            return 0
        raise AssertionError(args.command)
    finally:
        await store.close(etcd)


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def build_parser(
    more: Callable[[Subcommands], None] | None = None,
) -> argparse.ArgumentParser:
    """wbctl's options and commands; ``more`` adds commands defined elsewhere (wbtools.cli)."""
    p = argparse.ArgumentParser(
        prog="wbctl",
        description="Read and write Weighbridge backend sets in etcd, ask proxies how they "
        "route, and simulate a Service's spread.",
    )
    add_etcd_arguments(p)
    sub = p.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="show one backend set with its endpoints, or list them all")
    get.add_argument("service", nargs="?", metavar="NAMESPACE/NAME")
    get.add_argument("-o", "--output", choices=("table", "json"), default="table")
    put = sub.add_parser("put", help="write a backend set by hand")
    put.add_argument("service", metavar="NAMESPACE/NAME")
    put.add_argument("--strategy", required=True, choices=STRATEGIES)
    put.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT[=WEIGHT]",
        help="a backend; repeat for each (weight defaults to 1)",
    )
    put.add_argument(
        "--grpc-service",
        action="append",
        default=[],
        metavar="PACKAGE.SERVICE",
        help="a gRPC service name proxies may route to this set; repeatable",
    )
    put.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=TEXT",
        help="a failover policy, as its weighbridge.io/KEY annotation says it: "
        f"{', '.join(OPTION_KEYS)} (e.g. 'retry=on: unavailable; attempts: 3'); repeatable",
    )
    delete = sub.add_parser("delete", help="delete a backend set")
    delete.add_argument("service", metavar="NAMESPACE/NAME")
    proxies = sub.add_parser(
        "proxies", help="which proxies are running and whether they are in sync"
    )
    proxies.add_argument("-o", "--output", choices=("table", "json"), default="table")
    backends = sub.add_parser(
        "backends",
        help="ask one proxy (its admin API) how each endpoint is: state, why, counters",
    )
    backends.add_argument("service", nargs="?", metavar="NAMESPACE/NAME")
    backends.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help="the proxy's admin API, e.g. through kubectl -n weighbridge port-forward "
        "deploy/weighbridge-proxy 9501 (%(default)s)",
    )
    backends.add_argument("-o", "--output", choices=("table", "json"), default="table")
    etcd_auth = sub.add_parser("etcd-auth", help="etcd users and roles for Weighbridge")
    etcd_auth_sub = etcd_auth.add_subparsers(dest="etcd_auth_command", required=True)
    setup = etcd_auth_sub.add_parser(
        "setup",
        help="idempotently create the weighbridge-controller, weighbridge-proxy and root users "
        "and roles (users are client certificates' CNs) and enable auth; see "
        "docs/etcd-security.md",
    )
    setup.add_argument(
        "--prefix", default=argparse.SUPPRESS, help="etcd key prefix the roles cover"
    )
    if more is not None:
        more(sub)
    return p


def execute(command: Coroutine[Any, Any, int]) -> int:
    """Run one command to its exit code; an error it raises is printed as ``wbctl: …``."""
    try:
        return asyncio.run(command)
    except (WeighbridgeError, ValueError) as exc:
        sys.stderr.write(f"wbctl: {exc}\n")
        return 1


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(execute(run(args, sys.stdout)))


if __name__ == "__main__":
    main()
