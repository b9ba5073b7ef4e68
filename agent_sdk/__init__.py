"""The Orchestrator agent SDK: write agents, submit work, get results.

- :class:`BaseAgent`: subclass it and implement ``async execute(task) -> Result``.
- :class:`Client` / :class:`SyncClient`: submit tasks and await their results.
- :class:`Task`, :class:`Result`: what flows between them.
- :class:`StateClient` (``agent.state``, ``client.state``): shared versioned keys,
  compare-and-set, locks with fencing tokens, watches.
- Messaging (:mod:`agent_sdk.messaging`, methods of agents and clients): ``publish`` /
  ``subscribe`` on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for
  direct messages, ``agent.submit`` for subtasks.
"""

from __future__ import annotations

from agent_sdk.agent import AgentState, BaseAgent
from agent_sdk.client import Client, SyncClient, SyncTaskHandle, TaskHandle
from agent_sdk.errors import (
    BrokerUnavailable, OrchestratorError, PermanentFailure, RequestRefused, TaskNotFound,
    WaitTimeout,
)
from broker.resilience import CircuitBreaker, CircuitBreakerOpen, CircuitState, RetryPolicy
from agent_sdk.task import Result, Task, TaskError
from agent_sdk.errors import (
    LeaseLost, LockTimeout, StaleFencingToken, StateError, StateUnavailable, VersionConflict,
)
from agent_sdk.state import Change, Lease, StateClient, SyncStateClient, Versioned, Watch
from agent_sdk.client import SyncSubscription
from agent_sdk.errors import BusUnavailable, MailboxFull, NoSuchAgent, RemoteError
from agent_sdk.messaging import BusMessage, DirectMessage, Subscription

__all__ = [
    "AgentState", "BaseAgent", "BrokerUnavailable", "CircuitBreaker", "CircuitBreakerOpen",
    "CircuitState", "Client", "OrchestratorError", "PermanentFailure", "RequestRefused",
    "Result", "RetryPolicy", "SyncClient", "SyncTaskHandle", "Task", "TaskError",
    "TaskHandle", "TaskNotFound", "WaitTimeout",
    # shared state
    "Change", "Lease", "LeaseLost", "LockTimeout", "StaleFencingToken", "StateClient",
    "StateError", "StateUnavailable", "SyncStateClient", "VersionConflict", "Versioned", "Watch",
    # messaging
    "BusMessage", "BusUnavailable", "DirectMessage", "MailboxFull", "NoSuchAgent",
    "RemoteError", "Subscription", "SyncSubscription",
]
