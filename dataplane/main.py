"""weighbridge-proxy: not built yet (see the data-plane issue)."""

import sys


def main() -> None:
    sys.stderr.write("weighbridge-proxy: the data plane is not implemented yet\n")
    sys.exit(2)
