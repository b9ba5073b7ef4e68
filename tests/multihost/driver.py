"""A client application run inside a host: ``python -m tests.multihost.driver URL``.

The test process lives in the root network namespace, which has no route to the hosts'
network (on purpose: the tests add no device there). So the client is this process,
started in the ``client`` host, and the test drives it with one JSON request per line on
stdin; it answers each with one JSON line on stdout (``{"ok": ...}`` or
``{"error": ...}``). Its first line says it reached the broker.

Requests (``op`` and its arguments):

``status``
    the broker's status document.
``endpoints``
    the broker's announced endpoints as they are (``announced``) and as the SDK maps
    them for this client (``reachable``, :func:`wire.sockets.reachable_endpoints`).
``submit {ids, capabilities?, agent?, data?, fields?}``
    submits one task per id (data: the id's index unless ``data`` is given); answers
    once every one is accepted by the broker.
``results {ids, timeout}``
    the results of these tasks, in order, waiting ``timeout`` seconds in all. Ids are
    the ones the test named (``task_id``); ``wire_id`` is the broker's, which with
    ``--secure`` carries the client key's scope as a prefix.
``views``
    the client's view of every task it submitted: how many times its handle's
    done-callback ran (``resolved``), and how many terminal results reached the client
    on the wire (``deliveries``, before the SDK drops duplicates).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

from agent_sdk import SyncClient
from agent_sdk.errors import WaitTimeout
from tests.e2e.faults.checker import WireTap
from wire.sockets import reachable_endpoints


def result_doc(result: Any, task_id: str) -> dict[str, Any]:
    extras = dict(getattr(result, "extras", {}) or {})
    error = result.error
    return {"task_id": task_id, "wire_id": result.task_id, "status": result.status, "ok": result.ok,
            "agent": result.agent, "attempts": result.attempts, "data": result.data,
            "error": None if error is None else f"{error.code}: {error.message}",
            "extras": extras}


class Driver:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = SyncClient(url)
        self.tap = WireTap(self.client.client)
        self.handles: dict[str, Any] = {}
        #: the broker's id of each task -> the id the test named (with --secure the
        #: broker's id carries the client key's scope as a prefix: wire/curve.py)
        self.names: dict[str, str] = {}
        self.resolved: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _resolved(self, handle: Any) -> None:
        with self.lock:
            self.resolved[self.names.get(handle.id, handle.id)] += 1

    def status(self) -> dict[str, Any]:
        return self.client.status(timeout=10)

    def endpoints(self) -> dict[str, Any]:
        announced = dict(self.status()["broker"]["endpoints"])
        return {"announced": announced, "reachable": reachable_endpoints(announced, self.url)}

    def submit(self, ids: list[str], capabilities: list[str] | None = None,
               agent: str | None = None, data: Any = None,
               fields: dict[str, Any] | None = None) -> dict[str, Any]:
        handles = []
        for index, task_id in enumerate(ids):
            options: dict[str, Any] = dict(fields or {})
            if capabilities:
                options["capabilities"] = capabilities
            if agent:
                options["agent"] = agent
            handle = self.client.submit(data=index if data is None else data,
                                        task_id=task_id, **options)
            assert handle.id.endswith(task_id), (handle.id, task_id)
            self.names[handle.id] = task_id
            handle.add_done_callback(self._resolved)
            self.handles[task_id] = handle
            handles.append(handle)
        for handle in handles:
            handle.wait_accepted(timeout=20)
        return {"submitted": len(handles)}

    def results(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out: list[dict[str, Any]] = []
        for task_id in ids:
            try:
                result = self.handles[task_id].result(
                    timeout=max(deadline - time.monotonic(), 0.01))
            except WaitTimeout:
                fetched = self.client.fetch(task_id, timeout=5)
                raise TimeoutError(
                    f"no result for {task_id} within {timeout:g} s ({len(out)} of {len(ids)} "
                    f"arrived); broker: {fetched.status}, attempts {fetched.attempts}, "
                    f"agent {fetched.agent}; status {self.status()['tasks']}") from None
            out.append(result_doc(result, task_id))
        return out

    def views(self) -> dict[str, Any]:
        with self.lock:
            resolved = dict(self.resolved)
        deliveries = Counter(self.names.get(wire_id, wire_id)
                             for wire_id, _ in self.tap.snapshot())
        return {"resolved": {task_id: resolved.get(task_id, 0) for task_id in self.handles},
                "deliveries": dict(deliveries)}


def main() -> int:
    driver = Driver(sys.argv[1])
    driver.client.ping(20)
    print(json.dumps({"event": "ready", "url": driver.url}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply: dict[str, Any] = {"ok": getattr(driver, op)(**request)}
        except Exception as e:  # noqa: BLE001 - the test shows it
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply, default=repr), flush=True)
    driver.client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
