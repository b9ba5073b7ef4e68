"""Client-side retry policy and circuit breaker, to wrap any call an agent or client makes.

::

    policy = RetryPolicy(max_retries=3, base_delay=1.0, max_delay=60.0)
    result = await policy.execute(fetch_page, url)

    breaker = CircuitBreaker(failure_threshold=5, recovery_timeout=30.0)
    result = await breaker.call(flaky_service, request)   # CircuitBreakerOpen when open

The broker has a circuit breaker of its own (per agent, in ``broker.engine.circuit``); an
agent process never loads it, so the SDK keeps these helpers here with the same
behaviour and arguments.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent_sdk.errors import OrchestratorError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential back-off with jitter.

    The n-th retry (n >= 1) waits a random time in ``[d/2, d]`` where
    ``d = min(max_delay, base_delay * 2 ** (n - 1))``: the jitter spreads the retries of
    many calls that failed together, so that they do not hit a recovering service at once.

    Args:
        max_retries: retries after the first attempt (0: never retry).
        base_delay: seconds before the first retry (before jitter).
        max_delay: cap of any one delay, in seconds.
        rng: the source of jitter (injected so that tests can fix it).

    Raises:
        ValueError: a negative argument.
    """

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("max_retries, base_delay and max_delay must not be negative")

    def delay(self, retry: int) -> float:
        """Seconds to wait before a retry.

        Args:
            retry: its number, 1 for the first retry.

        Returns:
            A jittered delay in ``[d/2, d]`` (see the class docstring).
        """
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, retry - 1)))
        return self.rng.uniform(ceiling / 2, ceiling)

    async def execute(self, fn: Callable[..., Awaitable[T]], *args: Any,
                      retry_on: tuple[type[BaseException], ...] = (Exception,),
                      **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)``, retrying on ``retry_on`` errors.

        Args:
            fn: the coroutine function to call.
            retry_on: the exception classes that make a retry; any other propagates.

        Returns:
            What the first successful call returned.

        Raises:
            Exception: the last error, once ``max_retries`` retries have failed too.
        """
        retry = 0
        while True:
            try:
                return await fn(*args, **kwargs)
            except retry_on:
                retry += 1
                if retry > self.max_retries:
                    raise
                await asyncio.sleep(self.delay(retry))


class CircuitState(enum.Enum):
    """Closed: calls flow. Open: calls refused. Half-open: one probe call decides."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreakerOpen(OrchestratorError):
    """Raised when a call is refused because the circuit is open.

    Attributes:
        retry_in_s: seconds until the circuit lets a probe call through.
    """

    def __init__(self, retry_in_s: float) -> None:
        super().__init__(f"circuit open; next probe allowed in {max(0.0, retry_in_s):.1f} s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """Stops calling something that keeps failing, and probes it again later.

    After ``failure_threshold`` failures in a row the circuit opens; after
    ``recovery_timeout`` seconds it goes half-open and lets one probe through: success
    closes it, failure opens it again.

    Args:
        failure_threshold: consecutive failures that open the circuit.
        recovery_timeout: seconds the circuit stays open before a probe.
        clock: a monotonic clock (injected so that tests can move time).

    Raises:
        ValueError: ``failure_threshold`` below 1 or a negative ``recovery_timeout``.
    """

    def __init__(self, failure_threshold: int = 5, recovery_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or recovery_timeout < 0:
            raise ValueError("failure_threshold must be >= 1 and recovery_timeout >= 0")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.clock = clock
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probe_in_flight = False
        self._state = CircuitState.CLOSED

    @property
    def state(self) -> CircuitState:
        """The state now (an open circuit turns half-open once its recovery time passed)."""
        if self._state is CircuitState.OPEN and \
                self.clock() - self.opened_at >= self.recovery_timeout:
            self._state = CircuitState.HALF_OPEN
            self.probe_in_flight = False
        return self._state

    def allow(self) -> bool:
        """Whether a call may go now; in the half-open state only one (the probe) may."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """Count a successful call: the circuit closes."""
        self.consecutive_failures = 0
        self.probe_in_flight = False
        self._state = CircuitState.CLOSED

    def record_failure(self) -> None:
        """Count a failed call: the circuit opens at the threshold, or if the probe failed."""
        self.consecutive_failures += 1
        self.probe_in_flight = False
        if self._state is CircuitState.HALF_OPEN or \
                self.consecutive_failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self.opened_at = self.clock()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        Returns:
            What ``fn`` returned.

        Raises:
            CircuitBreakerOpen: the circuit is open (or half-open with a probe running).
        """
        if not self.allow():
            raise CircuitBreakerOpen(self.opened_at + self.recovery_timeout - self.clock())
        try:
            result = await fn(*args, **kwargs)
        except Exception:
            self.record_failure()
            raise
        self.record_success()
        return result


__all__ = ["CircuitBreaker", "CircuitBreakerOpen", "CircuitState", "RetryPolicy"]
