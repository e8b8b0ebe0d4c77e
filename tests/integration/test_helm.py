"""The Helm chart, with Helm's own engine (helm CLI built from the Go module proxy) and the
real kube-apiserver: render, lint, validate every manifest, install, and run the controller
with exactly the chart's RBAC."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aetcd
import pytest
import yaml

from controlplane.kube import Kube, KubeError
from controlplane.main import build_parser as controller_parser
from dataplane.main import build_parser as proxy_parser
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
    "servicemonitor-endpoints-source": [
        "serviceMonitor.enabled=true",
        "controller.source=endpoints",
    ],
}


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
        try:
            await k8s.kube.request(
                "POST",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                body=SERVICEMONITOR_CRD,
            )
        except KubeError as exc:
            assert exc.status == 409
        await asyncio.sleep(2)  # the new resource must be served before it validates
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] += f"-{uuid.uuid4().hex[:6]}"
        await dry_run_create(k8s.kube, doc)
    assert ("StatefulSet" in kinds) == (variant != "external-etcd")
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
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == [
                    "ALL"
                ]
                assert "resources" in c


def test_default_values_leave_every_tunable_to_the_binaries(helm: Path) -> None:
    """Only what the chart wires or needs itself (etcd, the source its RBAC grants, ports its
    Services and probes use, JSON logs, the grace its termination period outlasts) is passed;
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
    }


def test_set_values_become_flags_the_binaries_accept(helm: Path, tmp_path: Path) -> None:
    sets = [
        "proxy.threads=3",
        "proxy.maxConnectionAgeSeconds=300",
        "proxy.maxBackendConnections=2",
        "controller.workers=8",
    ]
    docs = render(helm, "default", sets)
    controller, proxy = args_of(docs, "controller"), args_of(docs, "proxy")
    assert "--workers=8" in controller
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
        "controller: {leaseTTL: 15, resyncSeconds: 600, logLevel: debug}\n"
        "proxy: {maxMessageBytes: 33554432, maxConnectionAgeSeconds: 0, logLevel: debug}\n"
    )
    docs = render(helm, "default", [], values)
    controller, proxy = args_of(docs, "controller"), args_of(docs, "proxy")
    assert {"--lease-ttl=15", "--resync=600", "--log-level=debug"} <= set(controller)
    assert {"--max-message-bytes=33554432", "--max-connection-age=0", "--log-level=debug"} <= set(
        proxy
    )
    controller_parser().parse_args(controller)
    proxy_parser().parse_args(proxy)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["proxy.replica=3"], "additional properties 'replica' not allowed"),
        (["etcd.mode=external"], "minItems: got 0, want 1"),
        (["proxy.kind=StatefulSet"], "value must be one of 'Deployment', 'DaemonSet'"),
        (["etcd.bundled.replicas=2"], "value must be one of 1, 3"),
        (["proxy.engine=native"], "additional properties 'engine' not allowed"),
        (["proxy.workers=2"], "additional properties 'workers' not allowed"),
        (["proxy.threads=0"], "at '/proxy/threads': minimum: got 0, want 1"),
        (["controller.workers=0"], "at '/controller/workers': minimum: got 0, want 1"),
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
        kubeconfig=apiserver.kubeconfig,
    )
    assert out.returncode == 0, out.stderr
    assert "kubectl annotate service" in out.stdout  # NOTES.txt tells the user what to do next
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
