"""Weighbridge's data plane: proxies that read backend sets from etcd and carry requests."""
