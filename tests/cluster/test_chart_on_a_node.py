"""The user's workflow on a real node (scripts/cluster): ``helm install`` with default values →
every pod Ready through its real probes → an annotated Service → calls through ``kubectl
port-forward`` split as annotated → ``kubectl annotate`` changes the split → the admin API
through a port-forward → ``helm upgrade`` rolling the proxies under traffic without losing a
call → the leading controller deleted → the etcd pod deleted → ``helm uninstall``.

The tests run in this order and share one release, as a user's session would; each says what
it leaves behind for the next. README's "Install in a cluster" gives the same commands.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from devtools.netns import PodNetwork
from tests.cluster.conftest import ROOT, Node
from weighbridge.v1 import admin_pb2, admin_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

CHART = str(ROOT / "deploy" / "helm" / "weighbridge")
NS = "weighbridge"
RELEASE = "weighbridge"
APP = "shop"
AUTHORITY = f"echo.{APP}"
PROXY = "weighbridge-proxy"
T = TypeVar("T")


def eventually(
    probe: Callable[[], T], accept: Callable[[T], bool], what: str, timeout: float = 120
) -> T:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if accept(last):
                return last
        except (AssertionError, grpc.RpcError) as exc:
            last = exc  # type: ignore[assignment]
        time.sleep(1)
    raise AssertionError(f"{what} not reached in {timeout:.0f} s; last: {last!r}")


def pods(node: Node, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        node.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    )["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def component(name: str) -> str:
    return f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={name}"


def who(channel: grpc.Channel) -> str:
    _, call = channel.unary_unary("/test.Echo/Unary").with_call(b"", timeout=10)
    return str(dict(call.initial_metadata())["x-backend"])


def versions(port: int, calls: int) -> collections.Counter[str]:
    """Which version answered each of ``calls`` calls through the proxy at ``port``."""
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", AUTHORITY)]
    ) as ch:
        return collections.Counter(who(ch).split("-")[1] for _ in range(calls))


def split_becomes(node: Node, target: str, v1: int, v2: int, what: str) -> None:
    """Every 100 calls through a port-forward to ``target`` split v1/v2 as given, once the
    proxies have the set (weighted_round_robin is exact over its period)."""
    with node.port_forward(NS, target, 8080) as port:
        eventually(lambda: versions(port, 100), lambda c: c == {"v1": v1, "v2": v2}, what)


def annotate_weights(node: Node, v1: int, v2: int) -> None:
    """``kubectl annotate`` the Service's group shares."""
    node.kubectl(
        "annotate", "service", "echo", "-n", APP, "--overwrite",
        f"weighbridge.io/weights=version=v1: {v1}%; version=v2: {v2}%",
    )  # fmt: skip


SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: NS
  annotations:
    weighbridge.io/strategy: weighted_round_robin
    weighbridge.io/weights: "version=v1: 90%; version=v2: 10%"
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 50051}]
"""

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-VERSION, namespace: NS}
spec:
  replicas: REPLICAS
  selector: {matchLabels: {app: echo, version: VERSION}}
  template:
    metadata: {labels: {app: echo, version: VERSION}}
    spec:
      containers:
        - name: echo
          image: IMAGE
          imagePullPolicy: IfNotPresent
          env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
          ports: [{name: grpc, containerPort: 50051}]
          readinessProbe: {grpc: {port: 50051}, periodSeconds: 2}
"""


def backends(image: str) -> str:
    """The annotated Service ``echo`` in APP, and two v1 pods and one v2 pod behind it."""
    docs = [SERVICE.replace("NS", APP)] + [
        DEPLOYMENT.replace("VERSION", v).replace("REPLICAS", str(n))
        .replace("NS", APP).replace("IMAGE", image)
        for v, n in (("v1", 2), ("v2", 1))
    ]  # fmt: skip
    return "---".join(docs)


@pytest.fixture(scope="module")
def release(node: Node) -> Iterator[Node]:
    """The chart installed with default values, and the backends of an annotated Service
    (after removing what an interrupted earlier session left: the cluster's state persists)."""
    node.helm("uninstall", RELEASE, "-n", NS, "--ignore-not-found", "--wait")
    node.kubectl("delete", "namespace", APP, NS, "--ignore-not-found", "--wait=true", timeout=300)
    node.helm("install", RELEASE, CHART, "-n", NS, "--create-namespace", "--wait")
    node.kubectl("create", "namespace", APP)
    node.kubectl("apply", "-f", "-", input=backends(node.backend_image))
    node.kubectl(
        "wait", "-n", APP, "--for=condition=Available", "deployment", "--all", "--timeout=120s"
    )
    try:
        yield node
    finally:
        subprocess.run(
            [
                str(node.helm_path),
                "--kubeconfig",
                str(node.kubeconfig),
                "uninstall",
                RELEASE,
                "-n",
                NS,
                "--wait",
            ],
            capture_output=True,
            timeout=300,
        )
        node.kubectl(
            "delete", "namespace", APP, NS, "--ignore-not-found", "--wait=true", timeout=300
        )


def a_proxy(node: Node) -> str:
    return str(pods(node, NS, component("proxy"))[0]["metadata"]["name"])


def test_install_brings_every_component_ready_through_its_probes(release: Node) -> None:
    for name, replicas in (("controller", 2), ("proxy", 2), ("etcd", 1)):
        found = pods(release, NS, component(name))
        assert len(found) == replicas, (name, [p["metadata"]["name"] for p in found])
        assert all(is_ready(p) for p in found), name


def test_calls_through_a_port_forward_split_as_annotated(release: Node) -> None:
    """weighted_round_robin is exact: every 100 calls, 90 to v1 and 10 to v2 (README:
    ``kubectl -n weighbridge port-forward svc/weighbridge-proxy 8080``, which enters one pod)."""
    split_becomes(release, f"svc/{PROXY}", 90, 10, "a 90/10 split")
    with release.port_forward(NS, f"svc/{PROXY}", 8080) as port:
        assert versions(port, 200) == {"v1": 180, "v2": 20}


def test_kubectl_annotate_changes_the_split(release: Node) -> None:
    annotate_weights(release, 50, 50)
    split_becomes(release, f"svc/{PROXY}", 50, 50, "a 50/50 split")


def test_the_admin_api_through_a_port_forward(release: Node) -> None:
    """README: ``port-forward deploy/weighbridge-proxy 9501`` (the admin API listens on the
    pod's loopback), ListBackendSets, Explain, and ``wbctl proxies`` in a controller pod."""
    names = {p["metadata"]["name"] for p in pods(release, NS, component("proxy"))}
    with (
        release.port_forward(NS, f"deploy/{PROXY}", 9501) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        stub = admin_pb2_grpc.AdminStub(ch)
        listed = stub.ListBackendSets(admin_pb2.ListBackendSetsRequest(), timeout=10)
        assert listed.proxy_id in names and listed.etcd_connected
        (echo,) = [s for s in listed.services if s.backend_set.name == "echo"]
        assert echo.backend_set.namespace == APP
        assert {b.endpoint.pod.split("-")[1] for b in echo.backends} == {"v1", "v2"}
        assert all(b.state == "healthy" for b in echo.backends)
        answer = stub.Explain(
            admin_pb2.ExplainRequest(authority=AUTHORITY, method="/test.Echo/Unary"), timeout=10
        )
        assert answer.service == f"{APP}/echo" and not answer.error
        assert answer.reason.startswith("weighted_round_robin: "), answer.reason
    table = release.kubectl(
        "exec", "-n", NS, "deploy/weighbridge-controller", "--",
        "wbctl", "--etcd", "weighbridge-etcd:2379", "proxies",
    )  # fmt: skip
    for name in names:
        assert name in table, table


def test_etcd_roles_hold_after_the_auth_job(release: Node) -> None:
    """The chart's post-install Job enabled etcd auth: a proxy's certificate reads the sets
    but cannot write them."""
    tls = [f"--etcd-{f}=/etc/weighbridge/etcd/{n}" for f, n in
           (("cacert", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))]  # fmt: skip
    wbctl = ["exec", "-n", NS, f"deploy/{PROXY}", "--", "wbctl", "--etcd",
             "weighbridge-etcd:2379", *tls]  # fmt: skip
    assert f"{APP}/echo" in release.kubectl(*wbctl, "get")
    with pytest.raises(AssertionError, match=r"(?i)permission denied"):
        release.kubectl(*wbctl, "delete", f"{APP}/echo")


@contextlib.contextmanager
def outside_host() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """A host outside the cluster: a test network namespace routed through this machine, as a
    client on the node's network would be. Yields ``run(SCRIPT, *ARGS, env=None)``, which
    starts the Python source SCRIPT there with its stdout piped."""
    with tempfile.TemporaryDirectory() as tmp, PodNetwork() as net:
        net.add_host("client")
        netns = f"{net.tag}-client"
        subprocess.run(
            ["ip", "netns", "exec", netns, "ip", "route", "add", "default",
             "via", f"198.18.{net.subnet}.254"],
            check=True,
        )  # fmt: skip
        started: list[subprocess.Popen[str]] = []

        def run(
            source: str, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.Popen[str]:
            script = Path(tmp) / f"client{len(started)}.py"
            script.write_text(textwrap.dedent(source))
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, str(script), *args],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            )  # fmt: skip
            started.append(proc)
            return proc

        try:
            yield run
        finally:
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()


CLIENT = """
import json, os, sys, threading, time, grpc
target, authority, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
stop = sys.argv[4]
ok, failed = [0], []
def caller(call):
    while time.monotonic() < until and len(failed) < 50 and not os.path.exists(stop):
        try:
            call(b"", timeout=5, metadata=(("x-delay-ms", "200"),))
            ok[0] += 1
        except grpc.RpcError as e:
            failed.append(f"{e.code().name}: {e.details()}")
with grpc.insecure_channel(target, options=[("grpc.default_authority", authority)]) as ch:
    call = ch.unary_unary("/test.Echo/Unary")
    threads = [threading.Thread(target=caller, args=(call,)) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
print(json.dumps({"ok": ok[0], "failed": failed}))
"""
"""Eight callers, each with one 200 ms call in flight at any time, until the stop file."""


def test_helm_upgrade_rolls_the_proxies_without_losing_a_call(
    release: Node, tmp_path: Path
) -> None:
    """A client in a test network namespace calls the proxies' Service (its ClusterIP), eight
    calls in flight at any time, while ``helm upgrade`` replaces every proxy pod. (A release
    installed with ``proxy.graceSeconds=0`` and ``proxy.drainDelaySeconds=0`` fails it: its
    proxies' calls in flight die with them; 8 UNAVAILABLE "Connection reset by peer" when
    tried.)"""
    cluster_ip = release.kubectl(
        "get", "service", PROXY, "-n", NS, "-o", "jsonpath={.spec.clusterIP}"
    )
    before = {p["metadata"]["name"] for p in pods(release, NS, component("proxy"))}
    with outside_host() as run:
        client = run(CLIENT, f"{cluster_ip}:8080", AUTHORITY, "300", str(tmp_path / "stop"))
        try:
            time.sleep(5)
            release.helm(
                "upgrade", RELEASE, CHART, "-n", NS, "--reuse-values",
                "--set", "proxy.graceSeconds=11", "--wait", "--timeout", "5m",
            )  # fmt: skip
            after = {p["metadata"]["name"] for p in pods(release, NS, component("proxy"))}
            assert not before & after, "every proxy pod was replaced"
            time.sleep(5)
        finally:
            (tmp_path / "stop").touch()
            out, _ = client.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert result is not None, "the client printed nothing"
    assert result["failed"] == [] and result["ok"] > 200, result


def leaders(node: Node) -> dict[str, float]:
    """Each controller pod's weighbridge_controller_leader, read through a port-forward."""
    found = {}
    for pod in pods(node, NS, component("controller")):
        name = pod["metadata"]["name"]
        with node.port_forward(NS, f"pod/{name}", 9402) as port:
            text = subprocess.run(
                ["curl", "-sf", f"http://127.0.0.1:{port}/metrics"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        values = [
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith("weighbridge_controller_leader ")
        ]
        found[name] = float(values[0]) if values else -1.0
    return found


def test_deleting_the_leading_controller_lets_the_other_lead(release: Node) -> None:
    now = eventually(
        lambda: leaders(release), lambda d: sorted(d.values()) == [0.0, 1.0], "one leader"
    )
    (leader,) = [name for name, v in now.items() if v == 1.0]
    release.kubectl("delete", "pod", leader, "-n", NS, "--wait=false")
    eventually(
        lambda: leaders(release),
        lambda d: any(v == 1.0 for n, v in d.items() if n != leader),
        "another controller leading",
        timeout=90,
    )
    # The new leader publishes: a change of weights reaches the proxies.
    annotate_weights(release, 80, 20)
    split_becomes(release, f"pod/{a_proxy(release)}", 80, 20, "an 80/20 split")


def test_without_etcd_the_proxies_keep_serving_then_resync(release: Node) -> None:
    (etcd,) = pods(release, NS, component("etcd"))
    name = etcd["metadata"]["name"]
    release.kubectl("delete", "pod", name, "-n", NS, "--wait=false")
    eventually(
        lambda: pods(release, NS, component("etcd")),
        lambda ps: not any(is_ready(p) for p in ps),
        "etcd down",
        timeout=60,
    )
    with release.port_forward(NS, f"pod/{a_proxy(release)}", 8080) as port:
        assert versions(port, 100) == {"v1": 80, "v2": 20}, "the last set, while etcd is down"
    eventually(
        lambda: pods(release, NS, component("etcd")),
        lambda ps: len(ps) == 1 and is_ready(ps[0]),
        "etcd back",
        timeout=180,
    )
    annotate_weights(release, 90, 10)
    split_becomes(release, f"pod/{a_proxy(release)}", 90, 10, "resynced")


XDS_CLIENT = """
import collections, json, sys, grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    call = ch.unary_unary("/test.Echo/Unary")
    got = collections.Counter()
    for _ in range(int(sys.argv[2])):
        _, answer = call.with_call(b"", timeout=10, wait_for_ready=True)
        got[dict(answer.initial_metadata())["x-backend"].split("-")[1]] += 1
print(json.dumps(got))
"""
"""``XDS_CLIENT TARGET N``: N calls through grpcio's own xds resolver; answers by version."""


def test_a_proxyless_client_balances_from_the_proxies_xds(release: Node) -> None:
    """``proxy.xds.enabled`` publishes the proxies' xDS port on their Service; a gRPC client
    outside the cluster, bootstrapped with that Service's ClusterIP, calls the pods itself with
    the Service's 90/10 shares (each call a weighted draw: within 5 sigma)."""
    release.helm(
        "upgrade", RELEASE, CHART, "-n", NS, "--reuse-values", "--wait",
        "--set", "proxy.xds.enabled=true", "--set", f"proxy.xds.namespaces={{{APP}}}",
    )  # fmt: skip
    ports = json.loads(release.kubectl("get", "service", PROXY, "-n", NS, "-o", "json"))
    cluster_ip = ports["spec"]["clusterIP"]
    (xds_port,) = [p["port"] for p in ports["spec"]["ports"] if p["name"] == "xds"]
    bootstrap = {
        "xds_servers": [
            {
                "server_uri": f"{cluster_ip}:{xds_port}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }
        ],
        "node": {"id": "cluster-test"},
    }
    calls = 1000
    with outside_host() as run:
        client = run(
            XDS_CLIENT, f"xds:///{AUTHORITY}", str(calls),
            env={"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap)},
        )  # fmt: skip
        out, _ = client.communicate(timeout=240)
    got = json.loads(out)
    assert sum(got.values()) == calls and set(got) == {"v1", "v2"}, got
    sigma = (calls * 0.1 * 0.9) ** 0.5
    assert abs(got["v2"] - calls * 0.1) <= 5 * sigma, got


KINDS = "all,configmaps,secrets,serviceaccounts,roles,rolebindings,poddisruptionbudgets,networkpolicies,leases,jobs,persistentvolumeclaims"


def test_helm_uninstall_leaves_only_what_the_chart_keeps(release: Node) -> None:
    release.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "3m")

    def left() -> list[str]:
        items = json.loads(release.kubectl("get", KINDS, "-n", NS, "-o", "json"))["items"]
        return sorted(
            f"{o['kind']}/{o['metadata']['name']}"
            for o in items
            if (o["kind"], o["metadata"]["name"])
            not in {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}
        )

    # The pods stop in their own time (the proxies drain), after helm has deleted their owners.
    eventually(
        left,
        lambda names: names == ["PersistentVolumeClaim/data-weighbridge-etcd-0"],
        "only etcd's claim left",
        timeout=120,
    )
    cluster_wide = json.loads(
        release.kubectl(
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            f"app.kubernetes.io/instance={RELEASE}",
            "-o",
            "json",
        )
    )["items"]
    assert cluster_wide == []
