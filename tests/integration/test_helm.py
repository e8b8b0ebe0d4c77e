"""The Helm chart, with Helm's own engine (helm CLI built from the Go module proxy) and the
real kube-apiserver: render, lint, validate every manifest, install, and run the controller
with exactly the chart's RBAC."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aetcd
import pytest
import yaml

from controlplane.kube import Kube, KubeError
from controlplane.main import build_parser as controller_parser
from controlplane.main import settings_of as controller_settings_of
from controlplane.settings import ControllerSettings
from dataplane.main import build_parser as proxy_parser
from dataplane.main import settings_of as proxy_settings_of
from devtools import testenv
from tests.integration import kubeobjects as ko
from tests.integration.conftest import Cluster, eventually, running_controller, stored_set
from weighbridge.keys import KeyScheme

pytestmark = pytest.mark.integration
CHART = str(testenv.ROOT / "deploy" / "helm" / "weighbridge")

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "bundled-etcd-3": ["etcd.bundled.replicas=3"],
    "bundled-etcd-ephemeral": ["etcd.bundled.persistence.enabled=false"],
    "external-etcd": [
        "etcd.mode=external",
        "etcd.external.endpoints={etcd-a.db.svc:2379,etcd-b.db.svc:2379}",
    ],
    "daemonset": ["proxy.kind=DaemonSet"],
    "etcd-cert-manager-3": ["etcd.tls.certManager.enabled=true", "etcd.bundled.replicas=3"],
    "etcd-cert-manager-issuer": [
        "etcd.tls.certManager.enabled=true",
        "etcd.tls.certManager.issuerRef.kind=ClusterIssuer",
        "etcd.tls.certManager.issuerRef.name=corp-ca",
    ],
    "external-etcd-tls": [
        "etcd.mode=external",
        "etcd.external.endpoints={etcd-a.db.svc:2379}",
        "etcd.external.tls.controllerSecretName=etcd-wb-controller",
        "etcd.external.tls.proxySecretName=etcd-wb-proxy",
        "etcd.external.tls.rootSecretName=etcd-root",
    ],
    "proxy-backend-tls": [
        "proxy.backendTLS.clientSecretName=proxy-client",
        "proxy.backendTLS.caSecretName=backends-ca",
        "proxy.backendTLS.namedCASecrets.payments=payments-ca",
    ],
    "plaintext-etcd-no-networkpolicy": ["etcd.tls.enabled=false", "networkPolicy.enabled=false"],
    "proxy-mtls": [
        "proxy.tls.secretName=proxy-tls",
        "proxy.tls.clientCASecretName=client-ca",
        "proxy.tls.allowedIdentities={spiffe://cluster.local/ns/shop/sa/api,api.shop}",
        "proxy.tls.allowH2C=true",
    ],
    "proxy-xds": [
        "proxy.xds.enabled=true",
        "proxy.xds.namespaces={shop,default}",
        "proxy.xds.maxStreams=50",
        "networkPolicy.xdsFrom[0].namespaceSelector.matchLabels.team=shop",
    ],
    "servicemonitor-endpoints-source": [
        "serviceMonitor.enabled=true",
        "controller.source=endpoints",
    ],
}


NO_KUBELET = ("--no-hooks",)
"""The test control plane has no kubelet, so no Job ever runs: Helm would wait for the
etcd-auth hook until its timeout. Its manifest is validated with the rest."""


@pytest.fixture(scope="module")
def helm() -> Path:
    return testenv.build("helm")


def run_helm(
    helm: Path, *args: str, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    extra = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
    return subprocess.run([str(helm), *args, *extra], capture_output=True, text=True, timeout=120)


def render(
    helm: Path, namespace: str, sets: list[str], values: Path | None = None
) -> list[dict[str, Any]]:
    args = ["template", "wb", CHART, "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        args += ["--values", str(values)]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def args_of(docs: list[dict[str, Any]], component: str) -> list[str]:
    """The command-line arguments of the controller's or the proxy's container."""
    (workload,) = (
        d
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    )
    args: list[str] = workload["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def flag_names(args: list[str]) -> set[str]:
    return {a.partition("=")[0] for a in args}


def controller_settings(args: list[str]) -> ControllerSettings:
    """The settings the controller's arguments give it (ValueError for values it refuses)."""
    return controller_settings_of(controller_parser().parse_args(args))


SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["selector"],
                                "properties": {
                                    "selector": {
                                        "type": "object",
                                        "properties": {
                                            "matchLabels": {
                                                "type": "object",
                                                "additionalProperties": {"type": "string"},
                                            }
                                        },
                                    },
                                    "endpoints": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "port": {"type": "string"},
                                                "interval": {
                                                    "type": "string",
                                                    "pattern": "^[0-9]+(ms|s|m|h)$",
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def open_crd(group: str, kind: str, plural: str) -> dict[str, Any]:
    """A namespaced custom resource whose spec the API server takes as it is: enough to
    dry-run the chart's cert-manager resources without cert-manager (its own webhook, not
    this chart, validates them)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


async def create_crds(kube: Kube, *crds: dict[str, Any]) -> None:
    for crd in crds:
        try:
            await kube.request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd
            )
        except KubeError as exc:
            assert exc.status == 409
    await asyncio.sleep(2)  # a new resource must be served before it validates


async def dry_run_create(kube: Kube, doc: dict[str, Any]) -> None:
    """Server-side dry run with strict field validation: the API server checks the manifest
    against its own schemas (unknown or misspelled fields fail)."""
    group_version = doc["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    plural = {
        "PodDisruptionBudget": "poddisruptionbudgets",
        "ServiceAccount": "serviceaccounts",
        "ClusterRole": "clusterroles",
        "ClusterRoleBinding": "clusterrolebindings",
        "Service": "services",
        "Deployment": "deployments",
        "DaemonSet": "daemonsets",
        "StatefulSet": "statefulsets",
        "ServiceMonitor": "servicemonitors",
        "Secret": "secrets",
        "NetworkPolicy": "networkpolicies",
        "Job": "jobs",
        "Certificate": "certificates",
        "Issuer": "issuers",
    }[doc["kind"]]
    ns = doc["metadata"].get("namespace")
    path = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
    await kube.request("POST", path, query={"dryRun": "All", "fieldValidation": "Strict"}, body=doc)


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_chart_lints_renders_and_every_manifest_validates(
    variant: str, helm: Path, k8s: Cluster
) -> None:
    sets = VARIANTS[variant]
    lint = run_helm(helm, "lint", "--strict", CHART, *[a for s in sets for a in ("--set", s)])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, k8s.ns, sets)
    kinds = sorted(d["kind"] for d in docs)
    if variant == "servicemonitor-endpoints-source":
        await create_crds(k8s.kube, SERVICEMONITOR_CRD)
    if "Certificate" in kinds:
        await create_crds(
            k8s.kube,
            open_crd("cert-manager.io", "Certificate", "certificates"),
            open_crd("cert-manager.io", "Issuer", "issuers"),
        )
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] += f"-{uuid.uuid4().hex[:6]}"
        await dry_run_create(k8s.kube, doc)
    assert ("StatefulSet" in kinds) == (not variant.startswith("external-etcd"))
    if variant == "external-etcd":
        assert "StatefulSet" not in kinds
        controller = next(
            d
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("controller")
        )
        assert (
            "--etcd=etcd-a.db.svc:2379,etcd-b.db.svc:2379"
            in controller["spec"]["template"]["spec"]["containers"][0]["args"]
        )
    if variant == "daemonset":
        assert "DaemonSet" in kinds
    for d in docs:  # hardened pods everywhere
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == [
                    "ALL"
                ]
                assert "resources" in c


ETCD_TLS_FLAGS = ("--etcd-cacert", "--etcd-cert", "--etcd-key")


def test_default_values_leave_every_tunable_to_the_binaries(helm: Path) -> None:
    """Only what the chart wires or needs itself (etcd and its client certificate, the source
    its RBAC grants, ports its Services and probes use, JSON logs, the grace its termination
    period outlasts, the pod's zone and node from the downward API) is passed;
    every tunable keeps the binary's own default."""
    docs = render(helm, "default", [])
    assert flag_names(args_of(docs, "controller")) == {
        "--etcd",
        "--prefix",
        "--source",
        "--admin-listen",
        "--health-listen",
        "--metrics-listen",
        "--log-format",
        *ETCD_TLS_FLAGS,
    }
    assert flag_names(args_of(docs, "proxy")) == {
        "--etcd",
        "--prefix",
        "--listen",
        "--admin-listen",
        "--health-listen",
        "--metrics-listen",
        "--grace",
        "--log-format",
        "--zone",
        "--node",
        *ETCD_TLS_FLAGS,
    }


def test_set_values_become_flags_the_binaries_accept(helm: Path, tmp_path: Path) -> None:
    sets = [
        "proxy.threads=3",
        "proxy.maxConnectionAgeSeconds=300",
        "proxy.maxBackendConnections=2",
        "controller.workers=8",
        "controller.grpcServiceNamespaces={payments,shop}",
    ]
    docs = render(helm, "default", sets)
    controller, proxy = args_of(docs, "controller"), args_of(docs, "proxy")
    assert {"--workers=8", "--grpc-service-namespaces=payments,shop"} <= set(controller)
    assert controller_settings(controller).grpc_service_namespaces == ("payments", "shop")
    assert {"--threads=3", "--max-connection-age=300", "--max-backend-connections=2"} <= set(proxy)
    assert controller_parser().parse_args(controller).workers == 8
    parsed = proxy_parser().parse_args(proxy)
    assert (parsed.threads, parsed.max_connection_age, parsed.max_backend_connections) == (
        3,
        300,
        2,
    )

    # From a values file numbers arrive as floats; 0 is a value (never), not "unset".
    values = tmp_path / "values.yaml"
    values.write_text(
        "controller: {leaseTTL: 15, resyncSeconds: 600, logLevel: debug, grpcServiceNamespaces: []}\n"
        "proxy: {maxMessageBytes: 33554432, maxConnectionAgeSeconds: 0, logLevel: debug}\n"
    )
    docs = render(helm, "default", [], values)
    controller, proxy = args_of(docs, "controller"), args_of(docs, "proxy")
    assert {"--lease-ttl=15", "--resync=600", "--log-level=debug"} <= set(controller)
    # An empty list is a value too: routing by gRPC service name off.
    assert "--grpc-service-namespaces=" in controller
    assert controller_settings(controller).grpc_service_namespaces == ()
    assert {"--max-message-bytes=33554432", "--max-connection-age=0", "--log-level=debug"} <= set(
        proxy
    )
    controller_parser().parse_args(controller)
    proxy_parser().parse_args(proxy)


def test_client_limits_become_proxy_flags(helm: Path, tmp_path: Path) -> None:
    """Each limit against hostile clients is a chart value that reaches the proxy's settings."""
    values = tmp_path / "values.yaml"
    values.write_text(
        "proxy:\n"
        "  clientHandshakeTimeoutSeconds: 5\n"
        "  clientIdleTimeoutSeconds: 0\n"
        "  maxClientConnections: 2000\n"
        "  clientMaxConcurrentStreams: 100\n"
        "  clientMaxHeaderListSize: 32768\n"
        "  streamIdleTimeoutSeconds: 21600\n"
        "  clientKeepaliveTimeSeconds: 600\n"
        "  clientKeepaliveTimeoutSeconds: 10\n"
        "  backendStreamWaitSeconds: 2.5\n"
    )
    proxy = args_of(render(helm, "default", [], values), "proxy")
    settings = proxy_settings_of(proxy_parser().parse_args(proxy))
    assert (
        settings.client_handshake_timeout_s,
        settings.client_idle_timeout_s,
        settings.max_client_connections,
        settings.client_max_concurrent_streams,
        settings.client_max_header_list_size,
        settings.stream_idle_timeout_s,
        settings.client_keepalive_time_s,
        settings.client_keepalive_timeout_s,
        settings.backend_stream_wait_s,
    ) == (5, 0, 2000, 100, 32768, 21600, 600, 10, 2.5)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["proxy.replica=3"], "additional properties 'replica' not allowed"),
        (["proxy.clientMaxHeaderListSize=100"], "minimum: got 100, want 1,024"),
        (["proxy.clientHandshakeTimeoutSeconds=0"], "exclusiveMinimum"),
        (["etcd.mode=external"], "minItems: got 0, want 1"),
        (["proxy.kind=StatefulSet"], "value must be one of 'Deployment', 'DaemonSet'"),
        (["etcd.bundled.replicas=2"], "value must be one of 1, 3"),
        (["proxy.engine=native"], "additional properties 'engine' not allowed"),
        (["proxy.workers=2"], "additional properties 'workers' not allowed"),
        (["proxy.threads=0"], "at '/proxy/threads': minimum: got 0, want 1"),
        (["controller.workers=0"], "at '/controller/workers': minimum: got 0, want 1"),
        (
            ["controller.grpcServiceNamespaces={Shop}"],
            "at '/controller/grpcServiceNamespaces/0': 'Shop' does not match pattern",
        ),
        (
            ["controller.grpcServiceNamespaces={*,shop}"],
            "at '/controller/grpcServiceNamespaces': maxItems: got 2, want 1",
        ),
        (
            ["proxy.maxBackendConnections=0"],
            "at '/proxy/maxBackendConnections': minimum: got 0, want 1",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_message(helm: Path, sets: list[str], message: str) -> None:
    out = run_helm(helm, "template", "wb", CHART, *[a for s in sets for a in ("--set", s)])
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


async def test_chart_installs_and_the_controller_works_with_exactly_its_rbac(
    helm: Path,
    k8s: Cluster,
    apiserver: testenv.KubeAPIServer,
    etcd_server: testenv.Etcd,
    etcd: aetcd.Client,
    scheme: KeyScheme,
    tmp_path: Path,
) -> None:
    release = f"wb{uuid.uuid4().hex[:6]}"
    out = await asyncio.to_thread(
        run_helm,
        helm,
        "install",
        release,
        CHART,
        "--namespace",
        k8s.ns,
        *NO_KUBELET,
        kubeconfig=apiserver.kubeconfig,
    )
    assert out.returncode == 0, out.stderr
    assert "kubectl annotate service" in out.stdout  # NOTES.txt tells the user what to do next
    # Admin is reached in a pod (it listens on loopback), the client port through the Service.
    assert f"port-forward deploy/{release}-weighbridge-proxy 9501" in out.stdout
    assert f"port-forward svc/{release}-weighbridge-proxy 8080:8080" in out.stdout
    assert "-weighbridge-proxy 9501:9501" not in out.stdout
    sa = f"{release}-weighbridge-controller"
    deployment = await k8s.kube.request(
        "GET", f"/apis/apps/v1/namespaces/{k8s.ns}/deployments/{sa}"
    )
    assert deployment["spec"]["replicas"] == 2

    # A token for the chart's ServiceAccount, and a kubeconfig that uses only it.
    token = (
        await k8s.kube.request(
            "POST",
            f"/api/v1/namespaces/{k8s.ns}/serviceaccounts/{sa}/token",
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600},
            },
        )
    )["status"]["token"]
    config = json.loads(apiserver.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    sa_kubeconfig = tmp_path / "controller-sa.kubeconfig"
    sa_kubeconfig.write_text(json.dumps(config))
    sa_kube = await Kube.connect(str(sa_kubeconfig))
    try:

        async def can(verb: str, resource: str, group: str = "") -> bool:
            review = await sa_kube.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                body={
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {
                        "resourceAttributes": {"verb": verb, "resource": resource, "group": group}
                    },
                },
            )
            return bool(review["status"]["allowed"])

        assert await can("watch", "endpointslices", "discovery.k8s.io")
        assert await can("create", "events")
        for verb, resource in (
            ("get", "secrets"),
            ("update", "services"),
            ("delete", "pods"),
            ("create", "leases"),
        ):
            assert not await can(
                verb, resource, "coordination.k8s.io" if resource == "leases" else ""
            ), (verb, resource)
    finally:
        await sa_kube.close()

    # The controller, authenticated as that ServiceAccount, does its whole job.
    await k8s.create(ko.service(k8s.ns, "api", {"weighbridge.io/strategy": "round_robin"}))
    await k8s.create(ko.endpoint_slice(k8s.ns, "api", "api-1", [ko.Ep(ko.address(1))]))
    await k8s.create(ko.service(k8s.ns, "bad", {"weighbridge.io/strategy": "nope"}))
    async with running_controller(sa_kubeconfig, etcd_server.endpoint, scheme) as controller:
        await eventually(lambda: stored_set(etcd, scheme, f"{k8s.ns}/api"), lambda s: s is not None)
        await eventually(
            lambda: k8s.events("bad"),
            lambda evs: any(e["reason"] == "InvalidStrategy" for e in evs),
        )
        assert (
            controller.metrics.registry.get_sample_value(
                "weighbridge_controller_watch_errors_total", {"kind": "Service"}
            )
            is None
        )
    uninstall = await asyncio.to_thread(
        run_helm, helm, "uninstall", release, "--namespace", k8s.ns, kubeconfig=apiserver.kubeconfig
    )
    assert uninstall.returncode == 0, uninstall.stderr


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    return doc


def selector(component: str, release: str = "wb") -> dict[str, Any]:
    return {
        "matchLabels": {
            "app.kubernetes.io/name": "weighbridge",
            "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": component,
        }
    }


PROMETHEUS = {
    "namespaceSelector": {},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def test_network_policies_admit_only_what_each_component_needs(helm: Path) -> None:
    """etcd's client port from the controller, the proxies and the etcd-auth Job only, its peer
    port from members only; the proxies' client port from anyone (or clientFrom), metrics from
    metricsFrom; nothing else, admin and health included."""
    policies = {
        d["metadata"]["name"]: d["spec"]
        for d in render(helm, "default", [])
        if d["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {
        "wb-weighbridge-etcd",
        "wb-weighbridge-proxy",
        "wb-weighbridge-controller",
    }
    for name, spec in policies.items():
        assert spec["podSelector"] == selector(name.removeprefix("wb-weighbridge-"))
        assert spec["policyTypes"] == ["Ingress"]

    client, peer = policies["wb-weighbridge-etcd"]["ingress"]
    assert client["from"] == [
        {"podSelector": selector("controller")},
        {"podSelector": selector("proxy")},
        {"podSelector": selector("etcd-auth")},
    ]
    assert client["ports"] == [{"port": 2379, "protocol": "TCP"}]
    assert peer == {
        "from": [{"podSelector": selector("etcd")}],
        "ports": [{"port": 2380, "protocol": "TCP"}],
    }

    clients, metrics = policies["wb-weighbridge-proxy"]["ingress"]
    assert clients == {"ports": [{"port": 8080, "protocol": "TCP"}]}  # no "from": anyone
    assert metrics == {"ports": [{"port": 9502, "protocol": "TCP"}], "from": [PROMETHEUS]}
    (controller,) = policies["wb-weighbridge-controller"]["ingress"]
    assert controller == {"ports": [{"port": 9402, "protocol": "TCP"}], "from": [PROMETHEUS]}

    # Configurable sources; metricsFrom [] admits no one; external etcd has no policy here.
    docs = render(
        helm,
        "default",
        [
            "networkPolicy.clientFrom[0].namespaceSelector.matchLabels.team=shop",
            "networkPolicy.metricsFrom=null",
            "etcd.mode=external",
            "etcd.external.endpoints={etcd.db:2379}",
        ],
    )
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"wb-weighbridge-proxy", "wb-weighbridge-controller"}
    assert policies["wb-weighbridge-proxy"]["ingress"] == [
        {
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}}],
        }
    ]
    assert policies["wb-weighbridge-controller"]["ingress"] == []

    off = render(helm, "default", ["networkPolicy.enabled=false"])
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]


def test_services_publish_no_admin_port_and_probes_use_the_health_port(helm: Path) -> None:
    docs = render(helm, "default", ["serviceMonitor.enabled=true"])
    proxy_service = one(docs, "Service", "wb-weighbridge-proxy")
    assert [(p["name"], p["port"]) for p in proxy_service["spec"]["ports"]] == [("grpc", 8080)]
    metrics = one(docs, "Service", "wb-weighbridge-proxy-metrics")
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9502)]
    controller_service = one(docs, "Service", "wb-weighbridge-controller")
    assert [p["name"] for p in controller_service["spec"]["ports"]] == ["metrics"]
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        # Selects the metrics Services only, never the clients' one.
        assert monitor["spec"]["selector"]["matchLabels"]["weighbridge.io/metrics"] == "true"
    assert "weighbridge.io/metrics" not in proxy_service["metadata"]["labels"]

    for component, parser, health in (
        ("proxy", proxy_parser, 9503),
        ("controller", controller_parser, 9403),
    ):
        (workload,) = (
            d
            for d in docs
            if d["kind"] == "Deployment"
            and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        parsed = parser().parse_args(container["args"])
        assert parsed.admin_listen.startswith("127.0.0.1:")  # loopback: port-forward only
        assert parsed.health_listen == f"0.0.0.0:{health}"
        assert {p["name"]: p["containerPort"] for p in container["ports"]}.get("health") == health
        assert "admin" not in {p["name"] for p in container["ports"]}
        probes = [container[k] for k in container if k.endswith("Probe")]
        assert probes and all(p["grpc"] == {"port": health} for p in probes)


def certificate(pem_b64: str) -> str:
    """openssl's text of a base64 PEM certificate from a Secret."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-issuer", "-ext", "subjectAltName"],
        input=base64.b64decode(pem_b64),
        capture_output=True,
        check=True,
    )
    return out.stdout.decode()


def verifies(ca_b64: str, cert_b64: str, tmp_path: Path) -> bool:
    ca, cert = tmp_path / "ca.pem", tmp_path / "cert.pem"
    ca.write_bytes(base64.b64decode(ca_b64))
    cert.write_bytes(base64.b64decode(cert_b64))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True)
    return out.returncode == 0


def test_etcd_tls_wires_every_component_with_its_own_certificate(
    helm: Path, tmp_path: Path
) -> None:
    """Bundled etcd serves and peers over TLS and requires client certificates; the controller,
    the proxies and the etcd-auth Job each mount their own (CN = etcd user) as a directory,
    never under subPath, and pass the files with the flags the binaries take."""
    docs = render(helm, "default", ["etcd.bundled.replicas=3"])
    etcd = one(docs, "StatefulSet", "wb-weighbridge-etcd")
    (server,) = etcd["spec"]["template"]["spec"]["containers"]
    flags = set(server["command"])
    assert {"--client-cert-auth", "--peer-client-cert-auth"} <= flags
    assert "--listen-client-urls=https://0.0.0.0:2379" in flags
    assert any(f.startswith("--initial-cluster=wb-weighbridge-etcd-0=https://") for f in flags)
    assert {
        v["name"]: v["secret"]["secretName"] for v in etcd["spec"]["template"]["spec"]["volumes"]
    } == {"tls": "wb-weighbridge-etcd-server"}

    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    ca = secrets["wb-weighbridge-etcd-ca"]["tls.crt"]
    for user, cn in (
        ("controller", "weighbridge-controller"),
        ("proxy", "weighbridge-proxy"),
        ("root", "root"),
        ("server", "wb-weighbridge-etcd"),
    ):
        data = secrets[f"wb-weighbridge-etcd-{user}"]
        assert f"subject=CN={cn}" in certificate(data["tls.crt"]).replace(" ", "")
        assert data["ca.crt"] == ca and verifies(ca, data["tls.crt"], tmp_path)
    assert "DNS:*.wb-weighbridge-etcd-peer.default.svc" in certificate(
        secrets["wb-weighbridge-etcd-server"]["tls.crt"]
    )

    job = one(docs, "Job", "wb-weighbridge-etcd-auth")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pods = {
        "controller": args_of(docs, "controller"),
        "proxy": args_of(docs, "proxy"),
    }
    parsed = {
        "controller": controller_parser().parse_args(pods["controller"]),
        "proxy": proxy_parser().parse_args(pods["proxy"]),
    }
    (job_container,) = job["spec"]["template"]["spec"]["containers"]
    assert job_container["args"][-2:] == ["etcd-auth", "setup"]
    workloads = {
        "controller": one(docs, "Deployment", "wb-weighbridge-controller"),
        "proxy": one(docs, "Deployment", "wb-weighbridge-proxy"),
        "root": job,
    }
    for user, workload in workloads.items():
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert {
            "--etcd-cacert=/etc/weighbridge/etcd/ca.crt",
            "--etcd-cert=/etc/weighbridge/etcd/tls.crt",
            "--etcd-key=/etc/weighbridge/etcd/tls.key",
        } <= set(args)
        assert {"name": "etcd-tls", "mountPath": "/etc/weighbridge/etcd", "readOnly": True} in (
            container["volumeMounts"]
        )
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        assert volumes["etcd-tls"] == f"wb-weighbridge-etcd-{user}"
    for user in ("controller", "proxy"):
        assert (parsed[user].etcd_cacert, parsed[user].etcd_cert) == (
            "/etc/weighbridge/etcd/ca.crt",
            "/etc/weighbridge/etcd/tls.crt",
        )
    for d in docs:  # a Secret mounted under subPath never sees its renewal
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            assert all("subPath" not in m for m in c.get("volumeMounts", [])), d["metadata"]["name"]


def test_xds_values_become_flags_a_service_port_and_a_network_policy(helm: Path) -> None:
    """Off by default (no flag, port or policy); on, the proxy serves xDS on proxy.xds.port,
    published as the proxy Service's port ``xds`` and admitted from networkPolicy.xdsFrom."""
    docs = render(helm, "default", [])
    assert not {f for f in flag_names(args_of(docs, "proxy")) if f.startswith("--xds")}
    assert [p["name"] for p in one(docs, "Service", "wb-weighbridge-proxy")["spec"]["ports"]] == [
        "grpc"
    ]

    docs = render(helm, "default", VARIANTS["proxy-xds"])
    settings = proxy_settings_of(proxy_parser().parse_args(args_of(docs, "proxy")))
    assert settings.xds_listen == "0.0.0.0:18000"
    assert settings.xds_namespaces == ("shop", "default")
    assert settings.xds_max_streams == 50
    pod = one(docs, "Deployment", "wb-weighbridge-proxy")["spec"]["template"]["spec"]
    assert {"name": "xds", "containerPort": 18000, "protocol": "TCP"} in pod["containers"][0][
        "ports"
    ]
    service = one(docs, "Service", "wb-weighbridge-proxy")
    assert service["spec"]["ports"][1] == {
        "name": "xds",
        "port": 18000,
        "targetPort": "xds",
        "protocol": "TCP",
        "appProtocol": "kubernetes.io/h2c",
    }
    policy = one(docs, "NetworkPolicy", "wb-weighbridge-proxy")["spec"]
    assert policy["ingress"][1] == {
        "ports": [{"port": 18000, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}}],
    }


def test_proxy_tls_values_become_the_proxy_flags(helm: Path) -> None:
    docs = render(helm, "default", VARIANTS["proxy-mtls"])
    args = args_of(docs, "proxy")
    parsed = proxy_parser().parse_args(args)
    assert (parsed.tls_cert, parsed.tls_key, parsed.tls_client_ca) == (
        "/etc/weighbridge/tls/tls.crt",
        "/etc/weighbridge/tls/tls.key",
        "/etc/weighbridge/client-ca/ca.crt",
    )
    assert "--tls-allowed-identities=spiffe://cluster.local/ns/shop/sa/api,api.shop" in args
    assert "--allow-h2c" in args
    pod = one(docs, "Deployment", "wb-weighbridge-proxy")["spec"]["template"]["spec"]
    assert {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]} == {
        "etcd-tls": "wb-weighbridge-etcd-proxy",
        "tls": "proxy-tls",
        "client-ca": "client-ca",
    }
    service = one(docs, "Service", "wb-weighbridge-proxy")
    assert "appProtocol" not in service["spec"]["ports"][0]  # not h2c any more

    docs = render(helm, "default", VARIANTS["proxy-backend-tls"])
    assert {
        "--backend-client-cert=/etc/weighbridge/backend-client/tls.crt",
        "--backend-client-key=/etc/weighbridge/backend-client/tls.key",
        "--backend-ca=/etc/weighbridge/backend-ca/ca.crt",
        "--backend-ca-dir=/etc/weighbridge/backend-cas",
    } <= set(args_of(docs, "proxy"))
    pod = one(docs, "Deployment", "wb-weighbridge-proxy")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["backend-ca-payments"] == "/etc/weighbridge/backend-cas/payments"  # NAME/ca.crt
    assert {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}[
        "backend-ca-payments"
    ] == "payments-ca"


async def etcd_secrets(kube: Kube, ns: str) -> dict[str, dict[str, str]]:
    """The data of the chart's etcd certificate Secrets in ``ns``, by name."""
    listing = await kube.request("GET", f"/api/v1/namespaces/{ns}/secrets")
    return {
        s["metadata"]["name"]: s["data"]
        for s in listing["items"]
        if s["metadata"]["name"].startswith("wb-weighbridge-etcd-")
    }


async def test_generated_etcd_certificates_are_kept_across_helm_upgrade(
    helm: Path, k8s: Cluster, apiserver: testenv.KubeAPIServer
) -> None:
    """The chart generates etcd's certificates on install and, through `lookup` against the
    real API server, reuses them on every upgrade; a leaf Secret deleted by hand (to renew it)
    is signed again by the same CA, and no other certificate changes."""

    async def helm_run(*args: str) -> None:
        out = await asyncio.to_thread(
            run_helm,
            helm,
            *args,
            "wb",
            CHART,
            "--namespace",
            k8s.ns,
            *NO_KUBELET,
            kubeconfig=apiserver.kubeconfig,
        )
        assert out.returncode == 0, out.stderr

    async def secrets() -> dict[str, dict[str, str]]:
        return await etcd_secrets(k8s.kube, k8s.ns)

    await helm_run("install")
    installed = await secrets()
    assert set(installed) == {
        f"wb-weighbridge-etcd-{n}" for n in ("ca", "server", "controller", "proxy", "root")
    }
    await helm_run("upgrade", "--set", "proxy.replicas=3")
    assert await secrets() == installed

    await k8s.kube.request(
        "DELETE", f"/api/v1/namespaces/{k8s.ns}/secrets/wb-weighbridge-etcd-proxy"
    )
    await helm_run("upgrade")
    renewed = await secrets()
    assert (
        renewed["wb-weighbridge-etcd-proxy"]["tls.crt"]
        != installed["wb-weighbridge-etcd-proxy"]["tls.crt"]
    )
    assert {k: v for k, v in renewed.items() if not k.endswith("-proxy")} == {
        k: v for k, v in installed.items() if not k.endswith("-proxy")
    }
    assert (
        renewed["wb-weighbridge-etcd-proxy"]["ca.crt"]
        == installed["wb-weighbridge-etcd-ca"]["tls.crt"]
    )
    out = await asyncio.to_thread(
        run_helm, helm, "uninstall", "wb", "--namespace", k8s.ns, kubeconfig=apiserver.kubeconfig
    )
    assert out.returncode == 0, out.stderr


class ChartEtcd(testenv.Etcd):
    """A real etcd on loopback with the client-side TLS flags of the chart's StatefulSet, its
    files where the chart's generated Secrets were written."""

    scheme = "https"

    def __init__(self, workdir: Path, flags: list[str], root: Path) -> None:
        super().__init__(workdir, "chart-etcd")
        self.flags, self.root = flags, root

    def _tls_args(self) -> list[str]:
        return self.flags

    def _health_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.root / "ca.crt"))
        context.load_cert_chain(str(self.root / "tls.crt"), str(self.root / "tls.key"))
        return context


def test_chart_certificates_and_etcd_auth_job_lock_a_real_etcd_down(
    helm: Path, tmp_path: Path
) -> None:
    """End to end with what the chart renders: etcd started with the StatefulSet's TLS flags and
    the generated certificates, the etcd-auth Job's own command (root's certificate), then the
    controller's certificate may write a set and the proxy's may only read it."""
    docs = render(helm, "default", [])
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"].startswith("wb-weighbridge-etcd-"):
            directory = tmp_path / d["metadata"]["name"].removeprefix("wb-weighbridge-etcd-")
            directory.mkdir()
            for name, data in d["data"].items():
                (directory / name).write_bytes(base64.b64decode(data))
    (server,) = one(docs, "StatefulSet", "wb-weighbridge-etcd")["spec"]["template"]["spec"][
        "containers"
    ]
    client_tls = ("--cert-file", "--key-file", "--trusted-ca-file", "--client-cert-auth")
    flags = [
        f.replace("/etc/etcd/tls", str(tmp_path / "server"))
        for f in server["command"]
        if f.startswith(client_tls)
    ]
    assert len(flags) == 4
    etcd = ChartEtcd(tmp_path, flags, tmp_path / "root")
    etcd.start()
    try:

        def wbctl(args: list[str], user: str) -> subprocess.CompletedProcess[str]:
            args = [
                a.replace("/etc/weighbridge/etcd", str(tmp_path / user)).replace(
                    "--etcd=wb-weighbridge-etcd:2379", f"--etcd={etcd.endpoint}"
                )
                for a in args
            ]
            return subprocess.run(
                [sys.executable, "-m", "weighbridge.wbctl", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )

        (job,) = one(docs, "Job", "wb-weighbridge-etcd-auth")["spec"]["template"]["spec"][
            "containers"
        ]
        setup = wbctl(job["args"], "root")
        assert setup.returncode == 0, setup.stderr

        def as_user(user: str, *command: str) -> subprocess.CompletedProcess[str]:
            connect = [
                a
                for a in args_of(docs, user)
                if a.startswith(
                    ("--etcd=", "--prefix=", "--etcd-cacert", "--etcd-cert", "--etcd-key")
                )
            ]
            return wbctl([*connect, *command], user)

        put = ("put", "default/echo", "--strategy", "round_robin", "--endpoint", "10.0.0.1:80")
        written = as_user("controller", *put)
        assert written.returncode == 0, written.stderr
        refused = as_user("proxy", *put)
        assert refused.returncode != 0
        assert "permission denied" in refused.stderr.lower(), refused.stderr
        read = as_user("proxy", "get", "default/echo")
        assert read.returncode == 0 and "10.0.0.1" in read.stdout, read.stderr
    finally:
        etcd.stop()
