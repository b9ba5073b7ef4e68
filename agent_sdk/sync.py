"""The blocking API, for scripts and the CLI: ``SyncClient``, ``SyncStateClient``.

Each ``Sync*`` object runs its async counterpart on an event loop in a background
thread (:class:`LoopThread`, the one runner behind all of them); every method takes the
same arguments as the async one and blocks until it returns.

::

    with SyncClient("tcp://127.0.0.1:5555") as client:
        result = client.submit(capabilities=["echo"], data="hi").result(timeout=30)
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

from wire.state import LockInfo
from wire.nodes import ScaleReply
from wire.purge import PurgeReply
from agent_sdk.admin import PURGE_TIMEOUT_S, SCALE_TIMEOUT_S, purge, scale
from agent_sdk.client import Client, STATUS_TIMEOUT_S
from agent_sdk.handles import TaskHandle
from agent_sdk.loop import new_event_loop
from agent_sdk.messaging import BusMessage, DirectMessage, SUBSCRIBE_TIMEOUT_S, Subscription
from agent_sdk.state import StateClient, Versioned
from agent_sdk.task import Result

T = TypeVar("T")

#: How long closing waits for the loop thread to end.
THREAD_JOIN_S: Final = 5.0


class LoopThread:
    """An event loop (uvloop when present) running in a daemon thread.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call ``callback(*args)`` on the loop's thread, soon."""
        self.loop.call_soon_threadsafe(callback, *args)

    def close(self, last: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> None:
        """Run ``last()`` on the loop (the owner's own close), then stop the loop, join
        the thread and close the loop. Closing again does nothing."""
        if self.loop.is_closed():
            return
        try:
            if last is not None:
                self.call(last())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=THREAD_JOIN_S)
            self.loop.close()


class _Blocking:
    """What every ``Sync*`` owner of a loop thread shares: the blocking call into it
    and closing as a context manager."""

    _runner: LoopThread

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.call(coro)

    async def _close_async(self) -> None:
        """Close the async counterpart (on the loop thread)."""

    def close(self) -> None:
        """Close the async counterpart, then the loop thread."""
        self._runner.close(self._close_async)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- tasks


class SyncTaskHandle:
    """Blocking view of a :class:`~agent_sdk.handles.TaskHandle`."""

    def __init__(self, handle: TaskHandle, client: SyncClient) -> None:
        self._handle = handle
        self._client = client
        self.id = handle.id

    def result(self, timeout: float | None = None) -> Result:
        """The task's final result; see :meth:`TaskHandle.result`."""
        return self._client._call(self._handle.result(timeout))

    def done(self) -> bool:
        """Whether the result is in."""
        return self._handle.done()

    def result_nowait(self) -> Result:
        """The result of a finished task (see :meth:`done`)."""
        return self._handle.result_nowait()

    def add_done_callback(self, callback: Callable[[SyncTaskHandle], Any]) -> None:
        """Call ``callback(handle)`` once the result is in. It runs on the client's
        background thread: keep it short, and guard what it shares with yours."""
        self._client._runner.call_soon(self._handle.add_done_callback, lambda _: callback(self))

    def cancel(self) -> None:
        """Ask the broker to cancel the task."""
        self._client._call(self._handle.cancel())

    def wait_accepted(self, timeout: float | None = None) -> None:
        """Return once the broker confirmed it holds the task."""
        self._client._call(self._handle.wait_accepted(timeout))


class SyncSubscription:
    """Blocking view of a :class:`~agent_sdk.messaging.Subscription` (queue mode)."""

    def __init__(self, subscription: Subscription, client: SyncClient) -> None:
        self._subscription = subscription
        self._client = client
        self.topic = subscription.topic

    def next(self, timeout: float | None = None) -> BusMessage:
        """The next :class:`~agent_sdk.messaging.BusMessage` (WaitTimeout after
        ``timeout`` seconds)."""
        return self._client._call(self._subscription.next(timeout))

    def unsubscribe(self) -> None:
        """Stop receiving."""
        self._client._call(self._subscription.unsubscribe())


class SyncClient(_Blocking):
    """The :class:`~agent_sdk.client.Client` API as blocking calls, for scripts and the CLI.

    It runs a :class:`~agent_sdk.client.Client` on an event loop in a background
    thread; every method takes the same arguments as the async one.
    """

    def __init__(self, broker: str | None = None, **options: Any) -> None:
        self._runner = LoopThread("orchestrator-client")
        self.client = Client(broker, **options)
        self._call(self.client.connect())

    async def _close_async(self) -> None:
        await self.client.close()

    def submit(self, text: str | None = None, **options: Any) -> SyncTaskHandle:
        """Submit a task; see :meth:`Client.submit`."""
        async def submit() -> TaskHandle:
            return self.client.submit(text, **options)

        return SyncTaskHandle(self._call(submit()), self)

    def watch(self, task_id: str) -> SyncTaskHandle:
        """A handle for a task submitted earlier; see :meth:`Client.watch`."""
        async def watch() -> TaskHandle:
            return self.client.watch(task_id)

        return SyncTaskHandle(self._call(watch()), self)

    def fetch(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> Result:
        """The task's result or current state; see :meth:`Client.fetch`."""
        return self._call(self.client.fetch(task_id, timeout))

    def cancel(self, task_id: str) -> None:
        """Ask the broker to cancel a task."""
        self._call(self.client.cancel(task_id))

    def release(self, task_ids: Iterable[str]) -> None:
        """Let the broker drop these held results (``submit(..., hold=True)``) under its
        retention limits again; see :meth:`Client.release`."""
        self._call(self.client.release(list(task_ids)))

    def status(self, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """The broker's status document."""
        return self._call(self.client.status(timeout))

    def ping(self, timeout: float = 2.0) -> None:
        """Return if the broker answers within ``timeout``."""
        self._call(self.client.ping(timeout))

    def tasks(self, statuses: Iterable[str] | None = None, limit: int = 100,
              timeout: float = STATUS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Finished tasks the broker retains; see :meth:`Client.tasks`."""
        return self._call(self.client.tasks(statuses, limit, timeout))

    def trace(self, task_id: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
        """A task's state, timeline and subtask tree."""
        return self._call(self.client.trace(task_id, timeout))

    def purge(self, before: float | None = None,
              timeout: float = PURGE_TIMEOUT_S) -> PurgeReply:
        """Purge finished tasks' payloads; see :func:`agent_sdk.admin.purge`."""
        return self._call(purge(self.client, before, timeout))

    def scale(self, name: str, replicas: int,
              timeout: float = SCALE_TIMEOUT_S) -> ScaleReply:
        """Set agent ``name``'s replica total; see :func:`agent_sdk.admin.scale`."""
        return self._call(scale(self.client, name, replicas, timeout))

    def wait_for_agents(self, count: int = 1, capability: str | Iterable[str] | None = None,
                        name: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until ``count`` live agents match; see :meth:`Client.wait_for_agents`."""
        return self._call(self.client.wait_for_agents(count, capability, name, timeout))

    def send(self, to: str, message: Any, **options: Any) -> None:
        """Send a direct message; see :meth:`Client.send`."""
        self._call(self.client.send(to, message, **options))

    def request(self, to: str, message: Any, **options: Any) -> Any:
        """Send a request and return the reply; see :meth:`Client.request`."""
        return self._call(self.client.request(to, message, **options))

    def receive(self, timeout: float | None = None) -> DirectMessage:
        """The next direct message from the mailbox."""
        return self._call(self.client.receive(timeout))

    def publish(self, topic: str, message: Any) -> None:
        """Publish on the bus; see :meth:`Client.publish`."""
        self._call(self.client.publish(topic, message))

    def wait_for_subscribers(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S) -> None:
        """Return once a subscription matching ``topic`` reached this publisher."""
        self._call(self.client.wait_for_subscribers(topic, timeout))

    def subscribe(self, topic: str, timeout: float = SUBSCRIBE_TIMEOUT_S) -> SyncSubscription:
        """Subscribe to a topic prefix; returns once the subscription is confirmed."""
        async def subscribe() -> Subscription:
            return await self.client.subscribe(topic).confirm(timeout)

        return SyncSubscription(self._call(subscribe()), self)


# ---------------------------------------------------------------------- state


class SyncStateClient(_Blocking):
    """The :class:`~agent_sdk.state.StateClient` API as blocking calls (scripts, the
    CLI), run on an event loop in a background thread. Locks and watches need the async
    client."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._runner = LoopThread("orchestrator-state")
        self.client = StateClient(url, **options)

    async def _close_async(self) -> None:
        await self.client.close()

    def connect(self, timeout: float | None = None) -> None:
        """Open the connection and the session."""
        self._call(self.client.connect(timeout))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._call(self.client.get(key, default))

    def get_entry(self, key: str) -> Versioned:
        """The value and version of ``key``."""
        return self._call(self.client.get_entry(key))

    def set(self, key: str, value: Any, **options: Any) -> int:
        """Write ``key``; see :meth:`StateClient.set`."""
        return self._call(self.client.set(key, value, **options))

    def cas(self, key: str, expected_version: int, value: Any, **options: Any) -> int:
        """Compare-and-set ``key``; see :meth:`StateClient.cas`."""
        return self._call(self.client.cas(key, expected_version, value, **options))

    def delete(self, key: str, **options: Any) -> bool:
        """Delete ``key``; see :meth:`StateClient.delete`."""
        return self._call(self.client.delete(key, **options))

    def update(self, key: str, updater: Callable[[Any], Any], **options: Any) -> Any:
        """Update ``key`` atomically; see :meth:`StateClient.update`."""
        return self._call(self.client.update(key, updater, **options))

    def list(self, prefix: str = "", *, values: bool = True) -> builtins.list[Versioned]:
        """Every key under ``prefix``."""
        return self._call(self.client.list(prefix, values=values))

    def locks(self, prefix: str = "") -> builtins.list[LockInfo]:
        """The held locks under ``prefix``."""
        return self._call(self.client.locks(prefix))

    def info(self) -> dict[str, Any]:
        """The service's counters."""
        return self._call(self.client.info())


__all__ = [
    "LoopThread", "SyncClient", "SyncStateClient", "SyncSubscription", "SyncTaskHandle",
]
