"""Cluster tests: real agents in network namespaces (root only)."""
