//go:build xds

// With -tags xds the load generator also dials xds:/// targets (proxyless gRPC: it balances by
// itself from the xDS server its bootstrap names, GRPC_XDS_BOOTSTRAP or
// GRPC_XDS_BOOTSTRAP_CONFIG). A build tag of its own, so that the default build does not
// compile grpc-go's xDS client and its dependencies.
package main

import _ "google.golang.org/grpc/xds" // registers the xds resolver and balancers
