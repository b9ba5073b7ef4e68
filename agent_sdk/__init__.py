"""The Orchestrator agent SDK: write agents, submit work, get results.

- :class:`BaseAgent`: subclass it and implement ``async execute(task) -> Result``.
- :class:`Client` / :class:`SyncClient`: submit tasks and await their results.
- :class:`Task`, :class:`Result`: what flows between them.
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

__all__ = [
    "AgentState", "BaseAgent", "BrokerUnavailable", "CircuitBreaker", "CircuitBreakerOpen",
    "CircuitState", "Client", "OrchestratorError", "PermanentFailure", "RequestRefused",
    "Result", "RetryPolicy", "SyncClient", "SyncTaskHandle", "Task", "TaskError",
    "TaskHandle", "TaskNotFound", "WaitTimeout",
]
