"""Fault-injection tests: real broker and agent processes, killed, stopped, partitioned
and restarted mid-work, with a Jepsen-style checker of what the client saw."""
