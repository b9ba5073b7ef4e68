"""Multi-host tests: a broker and nodes in network namespaces of their own (root only)."""
