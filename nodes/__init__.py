"""Node supervisors: ``python -m nodes`` keeps agent replicas running on one machine as the
broker plans them (``wire/nodes.py`` is its protocol)."""
