"""Workflows (pipelines, map-reduce, consensus, review loops) run through the broker."""
