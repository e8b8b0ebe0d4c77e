"""The proxy's xDS server, for proxyless gRPC clients (docs/xds.md).

:mod:`dataplane.xds.resources` turns an applied backend set into the four xDS resources a gRPC
client asks for (pure, no I/O); :mod:`dataplane.xds.server` serves them over the aggregated
discovery service (state of the world) and pushes every change. This package is the only one
that imports the xDS protobufs (``xds-protos``; an import-linter contract keeps it so).
"""
