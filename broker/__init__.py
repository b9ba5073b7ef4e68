"""The Orchestrator broker: routes tasks from clients to agents over one ROUTER socket."""

from __future__ import annotations

__version__ = "0.1.0"
