"""The broker's per-agent circuit breaker and its retry back-off, both driven by ``now``.

The engine holds no clock, so unlike the SDK's helpers (``agent_sdk.resilience``), these
take the time of the event they are told about: an open circuit turns half-open when a
reading of ``now`` passes its recovery time, which tests drive with a fake clock.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class CircuitState(enum.Enum):
    """Whether an agent gets work: CLOSED yes, OPEN no, HALF_OPEN one probe at a time."""

    __hash__ = object.__hash__  # identity, as members compare: C speed, not Enum's

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class AgentCircuit:
    """Stops giving work to an agent that keeps failing, and probes it again later.

    After ``failure_threshold`` failures in a row the circuit opens; ``recovery_s``
    later it goes half-open and lets one probe through: success closes it, failure opens
    it again.

    Args:
        failure_threshold: consecutive failures that open the circuit.
        recovery_s: seconds the circuit stays open before a probe.
    """

    __slots__ = ("failure_threshold", "recovery_s", "consecutive_failures", "opened_at",
                 "probe_in_flight", "state")

    def __init__(self, failure_threshold: int = 5, recovery_s: float = 30.0) -> None:
        if failure_threshold < 1 or recovery_s < 0:
            raise ValueError("failure_threshold must be >= 1 and recovery_s >= 0")
        self.failure_threshold = failure_threshold
        self.recovery_s = recovery_s
        self.consecutive_failures = 0
        self.opened_at = 0.0
        #: a half-open circuit's one probe task is out
        self.probe_in_flight = False
        #: the state as last evaluated; read :meth:`state_at` for the state now
        self.state = CircuitState.CLOSED

    def state_at(self, now: float) -> CircuitState:
        """The state at ``now`` (an open circuit turns half-open once its recovery time
        has passed)."""
        if self.state is CircuitState.OPEN and now - self.opened_at >= self.recovery_s:
            self.state = CircuitState.HALF_OPEN
            self.probe_in_flight = False
        return self.state

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.probe_in_flight = False
        self.state = CircuitState.CLOSED

    def record_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        self.probe_in_flight = False
        if self.state is CircuitState.HALF_OPEN or \
                self.consecutive_failures >= self.failure_threshold:
            self.state = CircuitState.OPEN
            self.opened_at = now


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """How many times a task is retried by default, and how long each retry waits:
    exponential back-off with full jitter, capped at ``max_delay_s``."""

    max_retries: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the first)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** max(0, retry - 1)))
        return random.uniform(ceiling / 2, ceiling)
