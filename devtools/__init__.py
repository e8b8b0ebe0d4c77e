"""Developer tools: the real test control plane and the local demo (not shipped)."""
