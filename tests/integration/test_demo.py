"""The README's run command (the local demo) works, in both of its modes, and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from devtools import testenv

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["kubernetes", "etcd-only"])
def test_demo_runs_every_phase_and_stops_everything(mode: str) -> None:
    if mode == "kubernetes" and os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    args = ["--seconds", "0.5"] + (["--etcd-only"] if mode == "etcd-only" else [])
    out = subprocess.run(
        [sys.executable, "-m", "devtools.demo", *args],
        cwd=testenv.ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for phase in ("round_robin", "random", "weighted_round_robin", "weighted_random"):
        assert f"▶ {phase}" in out.stdout
    assert (
        "kubectl annotate service shop" in out.stdout
        if mode == "kubernetes"
        else "wbctl put demo/shop" in out.stdout
    )
    assert "stopped everything the demo started" in out.stdout
    leftovers = subprocess.run(
        ["pgrep", "-f", "tests.echo shop-"], capture_output=True, text=True
    ).stdout
    assert leftovers == ""
    if mode == "kubernetes":
        assert (
            "wb"
            not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
