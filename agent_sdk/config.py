"""Where the SDK finds the broker and the state service when the caller names neither.

The variable names and defaults live in :mod:`wire.limits`, which the broker reads too;
the SDK reads the environment here, at the moment it needs a URL, so that a process may
set ``ORCH_BROKER`` after importing the SDK.
"""

from __future__ import annotations

import os

from wire.limits import BROKER_URL_ENV, DEFAULT_BROKER_URL, DEFAULT_STATE_URL, STATE_URL_ENV


def broker_url() -> str:
    """The broker URL agents and clients use by default.

    Returns:
        ``$ORCH_BROKER``, or ``tcp://127.0.0.1:5555`` when it is not set.
    """
    return os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL)


def state_url() -> str:
    """The state service URL a :class:`~agent_sdk.state.StateClient` uses by default.

    Returns:
        ``$ORCH_STATE``, or ``tcp://127.0.0.1:5558`` when it is not set.
    """
    return os.environ.get(STATE_URL_ENV, DEFAULT_STATE_URL)


__all__ = ["broker_url", "state_url"]
