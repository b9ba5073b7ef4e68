"""Map-reduce: the mapper over every item of a list, at most ``max_parallel`` at once,
then the reducer over the results in item order.

- The input must be a list. Item ``i`` runs the mapper at path ``<map>/<mapper>[i]``.
- At most ``max_parallel`` items are in flight at any moment (bounded fan-out: the rest
  wait here, not in the broker's queue).
- ``min_success`` (a fraction in (0, 1], or a count above 1) decides whether the reduce
  runs: with fewer successes the node fails, naming the failed items. Once so many items
  failed that it cannot be met, no more items start and the open ones are cancelled.
- The reducer's input is the succeeded items' data in item order; its task gets a field
  ``failed``: ``[{"index", "code", "error"}]`` for the failed items. The node's output is
  the reducer's (or, without a reducer, the list) with extras ``failed``, ``items`` and
  ``succeeded``.

A mapper that is a single task step runs on callbacks, no coroutine per item
(:class:`LeafMap`), since it is the common case and the one whose overhead shows at
10,000 items; any other mapper runs on ``max_parallel`` worker coroutines. Its items
publish no event each: a ``progress`` event with the map-reduce's ``path``, ``items`` and
``settled`` goes out at most every :data:`PROGRESS_INTERVAL_S` while they finish.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any, Final, TYPE_CHECKING

from agent_sdk import OrchestratorError, Result, ResultUnreadable, TaskHandle
from workflows.errors import StepFailed
from workflows.events import planned_steps
from workflows.ids import Scope
from workflows.model import MapReduce, TaskStep
from workflows.outputs import (
    entry_error, entry_output, is_reference, leaf_entry, StepOutput, SUCCEEDED,
)
from workflows.tasks import reread

if TYPE_CHECKING:
    from workflows.executor import Executor


#: Least time between two ``progress`` events of one map.
PROGRESS_INTERVAL_S: Final = 0.25


def required_successes(min_success: float, items: int) -> int:
    """How many of ``items`` must succeed: a fraction (<= 1) of them, rounded up, or a
    count (> 1)."""
    if min_success <= 1.0:
        # The epsilon keeps 0.95 * 100 (94.99999...) at 95, not 96 after ceil.
        return max(0, math.ceil(min_success * items - 1e-9))
    return int(min_success)


class ItemBook:
    """The items' outcomes, in item order.

    A success keeps its output's data, and its confidence and extras only when they say
    anything (the common item has neither: no object is made for it).

    Args:
        items: how many items there are.
        required: how many must succeed.
    """

    __slots__ = ("data", "ok", "more", "errors", "allowed_failures", "settled")

    def __init__(self, items: int, required: int) -> None:
        #: each succeeded item's data
        self.data: list[Any] = [None] * items
        #: whether each item succeeded
        self.ok: list[bool] = [False] * items
        #: ``(confidence, extras)`` of the succeeded items that have either
        self.more: dict[int, tuple[float, dict[str, Any]]] = {}
        self.errors: dict[int, tuple[str, str]] = {}
        self.allowed_failures = items - required
        self.settled = 0

    @property
    def hopeless(self) -> bool:
        """Whether so many items failed that ``min_success`` cannot be met any more."""
        return len(self.errors) > self.allowed_failures

    def succeed(self, index: int, output: StepOutput) -> None:
        self.data[index] = output.data
        self.ok[index] = True
        if output.confidence != 1.0 or output.extras:
            self.more[index] = (output.confidence, output.extras)
        self.settled += 1

    def fail(self, index: int, code: str, message: str) -> None:
        self.errors[index] = (code, message)
        self.settled += 1

    def settle(self, index: int, entry: dict[str, Any]) -> None:
        """Record item ``index`` from its task's checkpoint entry."""
        if entry.get("s") == SUCCEEDED:
            self.data[index] = entry.get("d")
            self.ok[index] = True
            if "c" in entry or "x" in entry:
                output = entry_output(entry)
                self.more[index] = (output.confidence, output.extras)
            self.settled += 1
        else:
            self.fail(index, *entry_error(entry))

    def failed(self) -> list[dict[str, Any]]:
        """``[{"index", "code", "error"}]`` of the failed items, in item order."""
        return [{"index": index, "code": code, "error": message}
                for index, (code, message) in sorted(self.errors.items())]

    def succeeded_data(self) -> list[Any]:
        """The succeeded items' data, in item order."""
        if len(self.errors) == 0 and self.settled == len(self.data):
            return list(self.data)
        return [data for data, ok in zip(self.data, self.ok) if ok]

    def succeeded(self) -> list[StepOutput]:
        """The succeeded items' outputs, in item order."""
        more = self.more
        outputs = []
        for index, (data, ok) in enumerate(zip(self.data, self.ok)):
            if ok:
                confidence, extras = more.get(index, (1.0, None))
                outputs.append(StepOutput(data, confidence, dict(extras or {})))
        return outputs


async def run_map_reduce(ex: Executor, node: MapReduce, data: Any, scope: Scope,
                         fields: dict[str, Any]) -> StepOutput:
    """Run a map-reduce node (see the module docstring).

    Raises:
        StepFailed: the input is not a list (``bad_input``), or fewer items succeeded
            than ``min_success`` asks (``min_success``), or the reducer failed.
    """
    if not isinstance(data, (list, tuple)):
        raise StepFailed(scope.path, "bad_input", f"a map-reduce needs a list as input, not "
                         f"{type(data).__name__}")
    items = list(data)
    required = required_successes(node.min_success, len(items))
    if required > len(items):
        raise StepFailed(scope.path, "min_success", f"min_success asks for {required} "
                         f"successes but the input has {len(items)} items")
    ex.progress.total += (len(items) - 1) * planned_steps(node.mapper)
    book = ItemBook(len(items), required)
    map_scope = scope.child(node.mapper.name)
    if isinstance(node.mapper, TaskStep):
        await LeafMap(ex, node.mapper, items, map_scope, fields, book, node.max_parallel).run()
    else:
        await _map_nodes(ex, node, items, map_scope, fields, book)
    failed = book.failed()
    results = book.succeeded_data()
    if len(results) < required:
        listed = "; ".join(f"[{f['index']}] {f['code']}: {f['error']}" for f in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise StepFailed(scope.path, "min_success", f"{len(results)} of {len(items)} items "
                         f"succeeded, {required} needed; failed: {listed}{more}")
    report = {"failed": failed, "items": len(items), "succeeded": len(results)}
    if node.reducer is None:
        return StepOutput(results, 1.0, report)
    reduced = await ex.node(node.reducer, results, scope.child(node.reducer.name),
                            {**fields, "failed": failed})
    return StepOutput(reduced.data, reduced.confidence, {**reduced.extras, **report})


class LeafMap:
    """Maps a task step over the items with at most ``max_parallel`` tasks in flight,
    topping the window up after results come in.

    The handles' done callbacks only queue the results; one callback per loop pass
    (scheduled by the pass's first result) settles them, checkpoints them in one call
    and submits the next items, so the results of every message read in one pass go back
    as one SUBMIT (fewer, larger messages through the broker and the agents), and the
    per-item work is a tight loop rather than a chain of calls per result.

    Args:
        ex: the executor.
        step: the mapper.
        items: the input list.
        scope: the mapper's scope (item ``i`` is ``scope.item(i)``).
        fields: extra task fields for every item.
        book: where outcomes go.
        max_parallel: most tasks in flight.
    """

    def __init__(self, ex: Executor, step: TaskStep, items: list[Any], scope: Scope,
                 fields: dict[str, Any], book: ItemBook, max_parallel: int) -> None:
        self.ex = ex
        self.step = step
        self.items = items
        self.scope = scope
        self.fields = fields
        self.book = book
        self.max_parallel = max_parallel
        self.prepared = ex.tasks.prepare(step, fields)
        #: task id -> item index of the items in flight
        self.open: dict[str, int] = {}
        #: items whose result is checkpointed by reference: read back, not recorded again
        self.references: set[int] = set()
        self._todo: Iterator[int] = iter(())
        self._done: asyncio.Future[None] | None = None
        self._stopping = False
        self._fill_scheduled = False
        self._reported_at = asyncio.get_running_loop().time()
        self._submit_item: Callable[[str, Any], TaskHandle] = self.prepared.submit
        #: ``(index, handle)`` of the results not settled yet (see :meth:`_fill`)
        self._arrived: list[tuple[int, TaskHandle]] = []
        self._canceller: asyncio.Task[None] | None = None
        #: results read again after a ResultUnreadable (see :meth:`_read_again`)
        self._reread: dict[str, Result] = {}
        self._rereading: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Map every item; returns when all settled (or the map became hopeless)."""
        log = self.ex.log
        base = self.scope.path
        todo: list[int] | range
        if log.empty():
            todo = range(len(self.items))  # a fresh run: nothing to look up
        else:
            todo = []
            for index in range(len(self.items)):
                entry = log.get(f"{base}[{index}]")
                if entry is None:
                    todo.append(index)
                elif is_reference(entry):
                    self.references.add(index)
                    todo.append(index)
                else:
                    self.book.settle(index, entry)
                    self.ex.progress.done += 1
        if not todo or self.book.hopeless:
            return
        self._todo = iter(todo)
        self._done = asyncio.get_running_loop().create_future()
        self._submit_item = self.prepared.item_submitter()
        untrack = self.ex.tasks.track(self.open)
        try:
            self._fill()
            await self._done
        finally:
            # Cancelled from outside (the run is stopping): no more submits.
            self._stopping = True
            untrack()

    def _fill(self) -> None:
        # Runs once per loop pass that brought results (hundreds of times for 10,000
        # items, where a per-item version cost several us an item): settles what
        # arrived, submitting the next item for each, then tops the window up.
        self._fill_scheduled = False
        if self._done is None or self._done.done():
            return
        if self._arrived:
            if not self._settle_arrived():
                return
        room = self.max_parallel - len(self.open)
        if room > 0 and not self._stopping:
            self._submit(room)
        if not self.open:
            self._finish(None)

    def _submit(self, count: int) -> bool:
        """Submit up to ``count`` more items; False when no item is left or the map
        stopped (a submit failed: the map has failed)."""
        submit = self._submit_item
        base = self.scope.path
        items = self.items
        todo = self._todo
        open_ = self.open
        on_result = self._on_result
        for _ in range(count):
            index = next(todo, None)
            if index is None:
                return False
            try:
                handle = submit(f"{base}[{index}]", items[index])
            except (StepFailed, OrchestratorError) as e:
                self._finish(e)
                return False
            open_[handle.id] = index
            handle.add_done_callback(on_result)
        return True

    def _on_result(self, handle: TaskHandle) -> None:
        task_id = handle.id
        index = self.open.pop(task_id, None)
        if index is None or self._done is None or self._done.done():
            return
        self._arrived.append((index, handle))
        if not self._fill_scheduled:
            self._fill_scheduled = True
            asyncio.get_running_loop().call_soon(self._fill)

    def _settle_arrived(self) -> bool:
        """Checkpoint and book the results that arrived since the last pass, submitting
        the next item after each; False when the map has ended meanwhile.

        Each settled handle is let go right after its successor is submitted: the cyclic
        GC counts allocations minus deallocations but never below zero, so freeing a
        pass's worth of handles and results first and allocating the next pass's after
        made it collect every ~700 items (dozens of times per 10,000 items)."""
        arrived, self._arrived = self._arrived, []
        arrived.reverse()  # taken from the end, in arrival order
        base = self.scope.path
        skip = len(self.ex.tasks.task_id_prefix)  # task id = prefix + the item's path
        references = self.references
        book = self.book
        book_data, book_ok = book.data, book.ok
        finished: list[tuple[str, dict[str, Any], str]] = []
        succeeded = processed = 0
        more = not self._stopping
        # _submit(1), inlined below
        submit = self._submit_item
        items = self.items
        todo = self._todo
        open_ = self.open
        on_result = self._on_result
        try:
            while arrived:
                index, handle = arrived.pop()
                try:
                    result = handle.result_nowait()
                except ResultUnreadable as e:
                    again = self._reread.pop(handle.id, None)
                    if again is None:
                        # Read it again in the background; the item stays open (its
                        # window slot taken) until that read settles it.
                        open_[handle.id] = index
                        self._read_again(handle, e)
                        del handle
                        continue
                    result = again
                except OrchestratorError as e:  # the broker refused this SDK's version
                    self._finish(e)
                    return False
                if result.status == SUCCEEDED and result.confidence == 1.0 and \
                        not result.extras:
                    # leaf_entry's common case, inlined
                    data = result.data
                    entry: dict[str, Any] = {"s": SUCCEEDED, "t": result.task_id}
                    if result.agent:
                        entry["a"] = result.agent
                    entry["d"] = data
                    if index not in references:
                        task_id = handle.id
                        finished.append((task_id[skip:], entry, task_id))
                    book_data[index] = data
                    book_ok[index] = True
                    succeeded += 1
                else:
                    entry = leaf_entry(result)
                    if index not in references or not result.ok:
                        task_id = handle.id
                        finished.append((task_id[skip:], entry, task_id))
                    book.settle(index, entry)
                    if book.hopeless and not self._stopping:
                        self._stopping = True
                        more = False
                        # Kept referenced: a task nobody references may be collected
                        # mid-flight.
                        self._canceller = asyncio.get_running_loop().create_task(
                            self._cancel_open())
                processed += 1
                del handle, result
                if more:
                    following = next(todo, None)
                    if following is None:
                        more = False
                        continue
                    try:
                        handle = submit(f"{base}[{following}]", items[following])
                    except (StepFailed, OrchestratorError) as e:
                        self._finish(e)
                        return False
                    open_[handle.id] = following
                    handle.add_done_callback(on_result)
                    del handle
        finally:
            book.settled += succeeded
            self.ex.progress.done += processed
            self.ex.log.record_tasks(finished)
            self._report_progress()
        return True

    def _read_again(self, handle: TaskHandle, error: ResultUnreadable) -> None:
        """Read a result whose payload could not be read again, a few times with a
        back-off (:func:`workflows.tasks.reread`); it then settles as any result: a
        failed read counts as the item's failure, so ``min_success`` decides."""
        async def read() -> None:
            try:
                self._reread[handle.id] = await reread(self.ex.client, handle.id, error)
            except OrchestratorError as e:  # the broker is gone: the run is driven again
                self._finish(e)
                return
            self._on_result(handle)

        task = asyncio.get_running_loop().create_task(read())
        self._rereading.add(task)
        task.add_done_callback(self._rereading.discard)

    def _report_progress(self) -> None:
        """A ``progress`` event, at most every PROGRESS_INTERVAL_S while items finish
        (items publish no event each)."""
        if self.scope.quiet:
            return  # a map inside a map item: the outer map reports
        now = asyncio.get_running_loop().time()
        if now - self._reported_at >= PROGRESS_INTERVAL_S:
            self._reported_at = now
            self.ex.events.emit("progress", path=self.scope.path.rpartition("/")[0],
                                items=len(self.items), settled=self.book.settled)

    async def _cancel_open(self) -> None:
        for task_id in list(self.open):
            await self.ex.client.cancel(task_id)

    def _finish(self, error: BaseException | None) -> None:
        if self._done is None or self._done.done():
            return
        if error is None:
            if not self.open:
                self._done.set_result(None)
            return
        self._stopping = True
        self._done.set_exception(error)


async def _map_nodes(ex: Executor, node: MapReduce, items: list[Any], scope: Scope,
                     fields: dict[str, Any], book: ItemBook) -> None:
    """Map a composite mapper with ``max_parallel`` worker coroutines."""
    todo = iter(range(len(items)))
    cancelled = False

    async def worker() -> None:
        nonlocal cancelled
        for index in todo:
            if book.hopeless:
                return
            try:
                output = await ex.node(node.mapper, items[index], scope.item(index), fields)
            except StepFailed as e:
                book.fail(index, e.code, e.reason)
                if book.hopeless and not cancelled:
                    # The items other workers still run cannot save the map any more.
                    cancelled = True
                    await ex.tasks.cancel_under(f"{scope.path}[")
                continue
            book.succeed(index, output)

    workers = min(node.max_parallel, len(items))
    if not workers:
        return
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())
    except BaseExceptionGroup as group_error:
        # One item ended the run (an approval rejected, say): raise that, not a group.
        raise _first(group_error) from None


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


__all__ = ["ItemBook", "LeafMap", "PROGRESS_INTERVAL_S", "required_successes", "run_map_reduce"]
