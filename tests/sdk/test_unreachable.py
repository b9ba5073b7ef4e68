"""A client pointed at an address with no broker: before any contact, BrokerUnavailable
naming the address (at once where the port refuses connections); after contact, a
broker restart is waited out and the task completes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from agent_sdk import BrokerUnavailable, Client
from tests.conftest import ROOT, Cluster


def _refusing_url() -> str:
    """An address where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def test_a_refused_port_is_broker_unavailable_at_once() -> None:
    url = _refusing_url()

    async def main() -> tuple[BaseException, BaseException, float]:
        async with Client(url) as client:
            started = time.monotonic()
            handle = client.submit(data=1, timeout=60)
            with pytest.raises(BrokerUnavailable) as waited:
                await handle.result(timeout=30)
            with pytest.raises(BrokerUnavailable) as asked:
                await client.status(timeout=30)
            return waited.value, asked.value, time.monotonic() - started

    waited, asked, took = asyncio.run(main())
    assert took < 1.0, took
    for error in (waited, asked):
        assert url in str(error) and "refused" in str(error)


def test_the_cli_reports_a_refused_port_in_under_a_second(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = _refusing_url()
    env = {**os.environ, "ORCH_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    # Python's start-up and imports are measured apart: the CLI's --help costs them too.
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "cli", "--help"], cwd=ROOT, env=env,
                   capture_output=True, timeout=30, check=True)
    startup = time.monotonic() - started
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "--broker", url, "status"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started - startup
    assert proc.returncode != 0 and url in proc.stderr + proc.stdout
    assert took < 1.0, (took, proc.stderr)


def test_after_contact_a_broker_restart_is_waited_out(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.agent(broker.url)

    async def main() -> str:
        async with Client(broker.url) as client:
            await client.ping(timeout=10)  # first contact
            broker.sigkill()
            # Submitted while no broker runs: the port refuses, but a broker was reached.
            handle = client.submit(capabilities=["echo"], data="after", timeout=60)
            # Started only after the client has seen the refusal (its handle still waits).
            await asyncio.get_running_loop().run_in_executor(None, cluster.restart, broker)
            result = await handle.result(timeout=30)
            return str(result.data)

    assert asyncio.run(main()) == "after"
