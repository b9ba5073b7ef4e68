"""The Orchestrator agent SDK: write agents, submit work, get results.

- :class:`BaseAgent`: subclass it and implement ``async execute(task) -> Result``.
- :class:`Client` / :class:`SyncClient`: submit tasks and await their results.
- :class:`Task`, :class:`Result`: what flows between them.
- :class:`StateClient` (``agent.state``, ``client.state``): shared versioned keys,
  compare-and-set, locks with fencing tokens, watches.
- Messaging (:mod:`agent_sdk.messaging`, methods of agents and clients): ``publish`` /
  ``subscribe`` on the bus, ``send`` / ``request`` / ``receive`` / ``on_message`` for
  direct messages, ``agent.submit`` for subtasks.
- :class:`RetryPolicy`, :class:`CircuitBreaker`: around any call of your own.
- In ``execute``: raise :class:`RetryableError` (or a class in the agent's ``retry_on``)
  for a transient fault the broker retries, :class:`PermanentFailure` for one it never
  retries; any other exception is the task's own failure (see :class:`BaseAgent`).

Every exception the SDK raises on purpose is an :class:`OrchestratorError`, the wire
protocol's errors (:class:`TooLarge`, ...) included. A broker (or state service) of
another protocol version refuses the SDK: everything waiting on it, and every later
call, raises :class:`VersionMismatch` at once, naming both versions.

The SDK needs only the :mod:`wire` package besides itself: it never loads the broker's.
"""

from __future__ import annotations

from agent_sdk.agent import AgentState, BaseAgent
from agent_sdk.client import Client
from agent_sdk.errors import (
    BrokerUnavailable, BusUnavailable, DecodeError, InvalidName, KeyConfigError, LeaseLost,
    LockTimeout, Unauthorized,
    MailboxFull, NoSuchAgent, OrchestratorError, PermanentFailure, RegistrationRefused,
    RemoteError, RequestRefused, ReservedTopic, RetryableError, StaleFencingToken,
    StateAccessDenied, StateError,
    StateUnavailable, TaskNotFound, TooLarge, VersionConflict, VersionMismatch, WaitTimeout,
    WireError,
)
from agent_sdk.handles import TaskHandle
from agent_sdk.messaging import BusMessage, DirectMessage, Subscription
from agent_sdk.payloads import ResultUnreadable
from agent_sdk.resilience import CircuitBreaker, CircuitBreakerOpen, CircuitState, RetryPolicy
from agent_sdk.state import Change, Lease, StateClient, Versioned, Watch
from agent_sdk.sync import SyncClient, SyncStateClient, SyncSubscription, SyncTaskHandle
from agent_sdk.task import Result, Task, TaskError

__all__ = [
    "AgentState", "BaseAgent", "BrokerUnavailable", "CircuitBreaker", "CircuitBreakerOpen",
    "CircuitState", "Client", "InvalidName", "KeyConfigError", "OrchestratorError", "PermanentFailure",
    "RegistrationRefused", "RequestRefused", "Result", "ResultUnreadable", "RetryPolicy",
    "RetryableError",
    "SyncClient", "SyncTaskHandle", "Task", "TaskError", "TaskHandle", "TaskNotFound",
    "Unauthorized", "VersionMismatch", "WaitTimeout",
    # wire errors, as the SDK raises them
    "DecodeError", "TooLarge", "WireError",
    # shared state
    "Change", "Lease", "LeaseLost", "LockTimeout", "StaleFencingToken", "StateAccessDenied",
    "StateClient",
    "StateError", "StateUnavailable", "SyncStateClient", "VersionConflict", "Versioned", "Watch",
    # messaging
    "BusMessage", "BusUnavailable", "DirectMessage", "MailboxFull", "NoSuchAgent",
    "RemoteError", "ReservedTopic", "Subscription", "SyncSubscription",
]
