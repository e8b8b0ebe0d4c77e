"""Node-local volumes for scripts/cluster: the provisioner of its StorageClass ``standard``.

    python3 devtools/volumes.py --server URL --ca CA --cert CERT --key KEY --root DIR --node NODE

A claim of a class whose provisioner is ``weighbridge.local/local-dir`` gets a directory
``DIR/pvc-<claim uid>`` and a ``local`` PersistentVolume pinned to NODE and bound to the claim.
``local``, not ``hostPath``: kubelet applies a pod's ``fsGroup`` to local volumes and never to
hostPath ones, so a StatefulSet running as a non-root user (the chart's etcd) can write. A volume
released with reclaim policy ``Delete`` loses its directory, then its PersistentVolume.

Level-triggered: every two seconds it lists claims and volumes and converges, so a restart or a
missed change costs nothing. Standard library only (it runs before any virtualenv exists);
started and stopped by scripts/cluster, exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import ssl
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

PROVISIONER = "weighbridge.local/local-dir"
POLL_SECONDS = 2.0


def log(event: str, **fields: object) -> None:
    """One line per event on stderr (the component's log file)."""
    details = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{time.strftime('%H:%M:%S')} {event} {details}".rstrip(), file=sys.stderr, flush=True)


class Api:
    """A minimal Kubernetes API client: JSON over one kept-alive HTTPS connection."""

    def __init__(self, server: str, context: ssl.SSLContext) -> None:
        url = urllib.parse.urlsplit(server)
        self._host, self._port = url.hostname or "", url.port or 443
        self._context = context
        self._conn: http.client.HTTPSConnection | None = None

    def call(self, method: str, path: str, body: object = None) -> Any:
        """The decoded response to ``method path``; raises RuntimeError on a non-2xx status."""
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self._host, self._port, context=self._context, timeout=10
            )
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        try:
            self._conn.request(method, path, body=data, headers=headers)
            resp = self._conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        if resp.status // 100 != 2:
            raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def volume_for(claim: dict[str, Any], path: Path, node: str) -> dict[str, Any]:
    """The PersistentVolume that satisfies ``claim`` with the directory ``path`` on ``node``."""
    meta, spec = claim["metadata"], claim["spec"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": path.name,
            "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
        },
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": spec["storageClassName"],
            "volumeMode": "Filesystem",
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


def sync(api: Api, root: Path, node: str) -> None:
    """Provision every pending claim of our classes; delete every released volume of ours."""
    classes = {
        sc["metadata"]["name"]
        for sc in api.call("GET", "/apis/storage.k8s.io/v1/storageclasses")["items"]
        if sc.get("provisioner") == PROVISIONER
    }
    volumes = {
        pv["metadata"]["name"]: pv for pv in api.call("GET", "/api/v1/persistentvolumes")["items"]
    }
    for claim in api.call("GET", "/api/v1/persistentvolumeclaims")["items"]:
        spec = claim["spec"]
        if (
            claim.get("status", {}).get("phase") != "Pending"
            or spec.get("storageClassName") not in classes
            or spec.get("volumeName")
        ):
            continue
        name = f"pvc-{claim['metadata']['uid']}"
        if name in volumes:
            continue
        if spec.get("volumeMode", "Filesystem") != "Filesystem":
            log("claim_skipped", claim=claim["metadata"]["name"], reason="only Filesystem volumes")
            continue
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # Any user may write; fsGroup, where set, narrows the group.
        api.call("POST", "/api/v1/persistentvolumes", volume_for(claim, path, node))
        log(
            "volume_provisioned",
            volume=name,
            claim=f"{claim['metadata']['namespace']}/{claim['metadata']['name']}",
        )
    for name, pv in volumes.items():
        annotations = pv["metadata"].get("annotations") or {}
        if (
            annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER
            or pv["spec"].get("persistentVolumeReclaimPolicy") != "Delete"
            or pv.get("status", {}).get("phase") not in ("Released", "Failed")
        ):
            continue
        path = Path(pv["spec"]["local"]["path"])
        if path.parent == root:
            shutil.rmtree(path, ignore_errors=True)
        api.call("DELETE", f"/api/v1/persistentvolumes/{name}")
        log("volume_deleted", volume=name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="the API server's URL")
    parser.add_argument("--ca", required=True, help="CA bundle that signed the API server")
    parser.add_argument("--cert", required=True, help="client certificate")
    parser.add_argument("--key", required=True, help="client key")
    parser.add_argument("--root", required=True, type=Path, help="directory for the volumes")
    parser.add_argument("--node", required=True, help="the node the volumes are on")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca)
    context.load_cert_chain(args.cert, args.key)
    api = Api(args.server, context)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log("started", root=args.root, node=args.node)
    while not stopping.is_set():
        try:
            sync(api, args.root.resolve(), args.node)
        except (OSError, RuntimeError, http.client.HTTPException, KeyError, ValueError) as e:
            log("sync_failed", error=repr(e))
        stopping.wait(POLL_SECONDS)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
