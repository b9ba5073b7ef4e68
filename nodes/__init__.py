"""Node supervisors: ``python -m nodes`` keeps agent replicas running on one machine as the
broker plans them (``wire/nodes.py`` is its protocol)."""

from typing import Final

#: The supervisor's pid file in its data dir. Here, not in :mod:`nodes.supervisor`, so
#: that the CLI finds it without importing the supervisor (zmq, the wire codecs).
PID_FILE: Final = "node.pid"
