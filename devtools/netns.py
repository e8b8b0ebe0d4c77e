"""Test hosts with their own IPs, like pods on a node: network namespaces on a bridge.

EndpointSlices reject loopback addresses, so end-to-end tests run backends in namespaces the
test creates: one bridge on the host (the "node", .254) and one namespace per host, joined by
a veth pair. Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking), one /24 per network.
Everything is removed on exit. Needs root and iproute2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class PodNetwork:
    """A bridge and namespaced hosts on 198.18.<subnet>.0/24."""

    def __init__(self, subnet: int | None = None) -> None:
        self.subnet = subnet if subnet is not None else 100 + os.getpid() % 150
        self.tag = f"wb{self.subnet}"
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PodNetwork:
        self.close()  # leftovers of an earlier run with the same subnet
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"198.18.{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add_host(self, name: str) -> str:
        """Create host ``name`` and return its IP."""
        n = len(self.hosts) + 1
        ns, veth = f"{self.tag}-{name}", f"{self.tag}v{n}"
        ip = f"198.18.{self.subnet}.{n}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _ip("link", "set", f"{veth}p", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", f"{veth}p")
        _ip("netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        self.hosts[name] = ip
        return ip

    def run(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside host ``name`` (stopped on exit)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{self.tag}-{name}", *argv],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    def echo(self, name: str, port: int = 50051) -> subprocess.Popen[bytes]:
        """Run the test echo backend (tests/echo.py) on host ``name``."""
        return self.run(
            name, [sys.executable, "-m", "tests.echo", name, self.hosts[name], str(port)]
        )

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            ns = line.split()[0] if line.strip() else ""
            if ns.startswith(f"{self.tag}-"):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.hosts.clear()
