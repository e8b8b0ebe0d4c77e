"""A proxy that serves no xDS loads none of the xDS protobufs (xds-protos): they cost memory
and start-up time in every proxy process otherwise."""

from __future__ import annotations

import subprocess
import sys


def test_the_proxy_imports_no_xds_protobufs_until_it_serves_xds() -> None:
    probe = (
        "import sys, dataplane.main, dataplane.app, dataplane.metrics\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('envoy', 'xds', 'udpa', 'validate') or m.startswith('dataplane.xds')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out
