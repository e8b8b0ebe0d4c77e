"""Weighbridge's control plane: Kubernetes Services in, weighted backend sets in etcd out."""
