"""Workflow runners: who drives runs, one lease per run, and the standing runner process.

A :class:`Runner` drives a run while it holds the run's lease (a lock of the state
service, renewed in the background, whose fencing token guards every write of the
run). A runner that dies stops renewing; its session with the state service expires
within a few heartbeats and its leases with it, and the next runner waiting for the
lease gets it and takes the run over from its checkpoints.

``python -m workflows.runner --broker URL`` is the standing runner (``orchestrator
start`` runs one). It watches the run records and, for every run that has not ended,
waits for the run's lease: a run just submitted gets it at once, a run driven elsewhere
when its driver lets go or dies. Once ready it prints one JSON line
``{"event": "ready", "runner_id", "pid", "broker"}`` on stdout, so that whoever started
it can wait for that instead of sleeping. It also takes the ended runs whose record still
says ``release_due`` (their end's release was lost) and releases their held results.

A run whose driving fails with an error that is neither the broker's nor the state
service's absence (a bug) is ended ``failed`` (code ``internal``, the error's one line),
its open tasks cancelled: ``workflow status`` never shows a run ``running`` that nobody
drives.

Exit codes: 0 stopped (SIGINT, SIGTERM), 1 the broker refused this SDK, 3 no broker
answered at the address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Final

import orjson

from agent_sdk import (
    BrokerUnavailable, Change, Client, Lease, OrchestratorError, StateError,
    StateUnavailable,
)
from agent_sdk.loop import run as run_loop
from workflows import ids
from workflows.driver import internal_error, Outcome, release_ended, RunDriver
from workflows.errors import RunNotFound
from workflows.runs import retry_unavailable, RunRecord, RunStatus, RunStore

logger = logging.getLogger(__name__)

#: Seconds a run's lease lasts without renewal (renewed every third of it). A runner
#: that dies loses it sooner: its state session ends after a few missed heartbeats.
LEASE_TTL_S: Final = 10.0
#: Back-off while the state service does not answer a lease request (it restarts).
ACQUIRE_RETRY_MIN_S: Final = 0.1
ACQUIRE_RETRY_MAX_S: Final = 2.0


class Runner:
    """Drives workflow runs through ``client`` (see the module docstring).

    Args:
        client: the broker connection (and, through it, the state service).
        runner_id: how runs name their driver (default: the client's id).
        lease_ttl_s: the lease's time to live.
    """

    def __init__(self, client: Client, *, runner_id: str | None = None,
                 lease_ttl_s: float = LEASE_TTL_S) -> None:
        self.client = client
        self.runner_id = runner_id or client.client_id
        self.lease_ttl_s = lease_ttl_s
        self.store = RunStore(client.state)
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    async def acquire(self, run_id: str, wait: float | None = None) -> Lease:
        """The lease of ``run_id``, waiting while another runner holds it (``wait``
        seconds at most; None: as long as it takes).

        Raises:
            LockTimeout: ``wait`` passed first.
        """
        delay = ACQUIRE_RETRY_MIN_S
        while True:
            try:
                return await self.client.state.acquire(ids.lease_name(run_id),
                                                       ttl=self.lease_ttl_s, wait=wait)
            except StateUnavailable as e:
                logger.warning("lease of run %s not granted (%s); asking again in %.1f s",
                               run_id, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, ACQUIRE_RETRY_MAX_S)

    async def acquire_presence(self) -> Lease:
        """The lock that tells clients this runner serves (``ids.RUNNERS_PREFIX``)."""
        return await self.client.state.acquire(ids.runner_presence(self.runner_id),
                                                ttl=self.lease_ttl_s, wait=None)

    async def drive(self, run_id: str, lease: Lease | None = None) -> RunRecord:
        """Drive ``run_id`` until it ends; returns its final record. Without ``lease``,
        waits for it first; a turn that loses the lease, or is asked to resume, waits
        for it again. An ended run whose release is due is released (again). An error
        that is not the broker's or the state service's absence (a bug) ends the run
        ``failed``, code ``internal``, rather than leaving it running with no driver.

        Raises:
            RunNotFound: there is no such run.
            asyncio.CancelledError: cancelled: the run is left to the next runner, its
                lease released and its tasks untouched.
        """
        delay = ACQUIRE_RETRY_MIN_S
        while True:
            if lease is None:
                lease = await self.acquire(run_id)
            try:
                record = await self.store.load(run_id)
                if record is None:
                    raise RunNotFound(run_id)
                if record.status.terminal:
                    if record.release_due:
                        await self._release_ended(record, lease)
                    return record
                outcome = await RunDriver(self.client, record, lease, self.runner_id).drive()
            except (BrokerUnavailable, StateUnavailable) as e:
                # The broker or the state service went away mid-turn: let the lease go
                # and try again, from the checkpoints, once they answer.
                logger.warning("run %s: %s; driving it again in %.1f s", run_id, e, delay)
                outcome = None
            except (RunNotFound, StateError):
                raise  # no run, or a lease refused: nothing this runner may write
            except Exception as e:  # noqa: BLE001 - a bug must end the run, not strand it
                logger.exception("run %s: driving it failed; it ends failed", run_id)
                if not await self._fail(run_id, lease, e):
                    raise  # it had ended: the bug is in the end's release, not the run
                outcome = None  # the next pass finds it ended and releases what it held
            finally:
                await lease.release()
                lease = None
            if outcome is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, ACQUIRE_RETRY_MAX_S)
                continue
            if outcome is Outcome.FINISHED:
                return await self.store.require(run_id)
            logger.info("run %s: %s; waiting for its lease again", run_id, outcome.value)

    async def _release_ended(self, record: RunRecord, lease: Lease) -> None:
        """Redo the lost release of an ended run (see :func:`release_ended`)."""
        try:
            await release_ended(self.client, record, lease)
        except (BrokerUnavailable, StateUnavailable):
            raise  # drive() tries again once they answer
        except StateError as e:
            logger.warning("run %s: release left to the next lease holder (%s)",
                           record.run_id, e)

    async def _fail(self, run_id: str, lease: Lease, error: BaseException) -> bool:
        """End ``run_id`` ``failed`` with ``error`` (code ``internal``), ``lease`` held;
        its release is then due, and :meth:`drive` does it. False: it had ended."""
        store = self.store
        record = await store.require(run_id)
        if record.status.terminal:
            return False
        record.status = RunStatus.FAILED
        record.error = internal_error(error)
        record.pending = []
        record.release_due = True
        record.finished_at = time.time()
        record.note("finished", by=self.runner_id,
                    detail=f"failed (internal: {record.error.message})")
        await retry_unavailable(lambda: store.save(record, lease), f"the record of run {run_id}")
        return True

    # ------------------------------------------------------------------ standing

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Drive every run that has not ended, as its lease comes free, until
        :meth:`stop`; ``on_ready`` is called once the watch on the runs is in place."""
        # Held (and renewed) while this runner serves; it lapses with the process.
        presence = await self.acquire_presence()
        watch = await self.client.state.watch(ids.RUNS_PREFIX, self._on_record)
        try:
            for record in await self.store.records():
                self._consider(record.run_id, record.status, record.release_due)
            if on_ready is not None:
                on_ready()
            await self._stopping.wait()
        finally:
            await watch.cancel()
            await presence.release()
            drivers = list(self._drivers.values())
            for driver in drivers:
                driver.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)

    def stop(self) -> None:
        """Make :meth:`serve` return (the runs it drives are left to other runners)."""
        self._stopping.set()

    @property
    def driving(self) -> list[str]:
        """The runs this runner drives or waits to drive."""
        return sorted(self._drivers)

    def _on_record(self, change: Change) -> None:
        run_id = ids.run_id_of_key(change.key)
        if run_id is None or change.deleted or not isinstance(change.value, dict):
            return
        try:
            status = RunStatus(change.value.get("status"))
        except ValueError:
            return
        self._consider(run_id, status, bool(change.value.get("release_due")))

    def _consider(self, run_id: str, status: RunStatus, release_due: bool = False) -> None:
        """Drive the run, unless it has ended (and its held results are released) or
        this runner drives it already."""
        if (status.terminal and not release_due) or run_id in self._drivers or \
                self._stopping.is_set():
            return
        driver = asyncio.get_running_loop().create_task(self._drive_logged(run_id),
                                                        name=f"drive-{run_id}")
        self._drivers[run_id] = driver
        driver.add_done_callback(lambda _: self._drivers.pop(run_id, None))

    async def _drive_logged(self, run_id: str) -> None:
        try:
            record = await self.drive(run_id)
        except RunNotFound:
            return
        except OrchestratorError:
            # State trouble outlasting the retries: the run stays for the next record
            # change (or the next runner) to pick up.
            logger.exception("run %s: driving it failed", run_id)
            return
        logger.info("run %s ended %s", run_id, record.status.value)


async def _serve(broker: str | None, runner_id: str | None) -> int:
    client = Client(broker)
    runner = Runner(client, runner_id=runner_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop)

    def ready() -> None:
        info = {"event": "ready", "runner_id": runner.runner_id, "pid": os.getpid(),
                "broker": client.url}
        sys.stdout.write(orjson.dumps(info).decode() + "\n")
        sys.stdout.flush()

    try:
        await runner.serve(ready)
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m workflows.runner",
                                     description="Run a standing workflow runner.")
    parser.add_argument("--broker", default=None, help="broker URL (default $ORCH_BROKER)")
    parser.add_argument("--runner-id", default=None, help="how runs name this runner")
    parser.add_argument("--log-level", default=os.environ.get("ORCH_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_loop(_serve(args.broker, args.runner_id))
    except BrokerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
