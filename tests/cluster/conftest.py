"""A real single-node Kubernetes (scripts/cluster) with the project's images, shared by the
cluster tests: up before the first, down after the last (before the other tests run, whose
network namespaces should not meet the node's bridge and firewall rules)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools import testenv

ROOT = testenv.ROOT


@dataclass(frozen=True)
class Node:
    kubeconfig: Path
    kubectl_path: Path
    helm_path: Path
    backend_image: str

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        return _tool(self.kubectl_path, self.kubeconfig, args, input, timeout)

    def helm(self, *args: str, timeout: float = 600) -> str:
        return _tool(self.helm_path, self.kubeconfig, args, None, timeout)

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, port: int) -> Iterator[int]:
        """``kubectl port-forward`` to ``target``'s ``port``; yields the local port."""
        proc = subprocess.Popen(
            [
                str(self.kubectl_path),
                "--kubeconfig",
                str(self.kubeconfig),
                "port-forward",
                "-n",
                namespace,
                target,
                f":{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = None
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> port"
            if not line.startswith("Forwarding from 127.0.0.1:"):
                raise AssertionError(f"kubectl port-forward {target}: {line.strip()}")
            # kubectl says "Handling connection for PORT" per connection: read on, so that a
            # full pipe never blocks it.
            reader = threading.Thread(target=proc.stdout.read, daemon=True)
            reader.start()
            yield int(line.split(":")[1].split()[0])
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if reader is not None:
                reader.join(timeout=10)  # EOF once kubectl has exited
            if proc.stdout is not None:
                proc.stdout.close()


def _tool(
    path: Path, kubeconfig: Path, args: tuple[str, ...], input: str | None, timeout: float
) -> str:
    """``path --kubeconfig KUBECONFIG ARGS...``'s output; its error as an AssertionError."""
    out = subprocess.run(
        [str(path), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode:
        raise AssertionError(f"{path.name} {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def _run(argv: list[str], timeout: float, input: str | None = None) -> str:
    out = subprocess.run(
        argv, cwd=ROOT, input=input, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-4000:]}")
    return out.stdout


@pytest.fixture(scope="package")
def node() -> Iterator[Node]:
    """scripts/cluster up (binaries and images cached; scripts/test builds them first), the
    chart's images and the backend image imported, and down at the end of the session."""
    started = time.monotonic()
    kubeconfig = Path(_run(["scripts/cluster", "up"], timeout=1800).split()[-1])
    refs = _run(["scripts/cluster", "load", "weighbridge", "backend", "etcd"], timeout=1200)
    backend = next(ref for ref in refs.split() if "/backend:" in ref)
    print(f"cluster up with images in {time.monotonic() - started:.0f} s")
    try:
        yield Node(
            kubeconfig, kubeconfig.parent / "bin" / "kubectl", testenv.build("helm"), backend
        )
    finally:
        _run(["scripts/cluster", "down"], timeout=300)
