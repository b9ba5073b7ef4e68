"""Agent names, ids and capabilities: 1 to 256 printable characters.

The broker refuses any other READY with ERROR ``bad_request`` (a newline in a name would
forge lines in its log). The SDK refuses them first, where the agent is built
(``BaseAgent(...)``, ``python -m agent_sdk run --name``), and an agent the broker refuses
all the same stops with :class:`RegistrationRefused` instead of registering again and
again: ``run`` and ``wait_registered`` raise it, ``python -m agent_sdk run`` exits 1 with
one line.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from agent_sdk import BaseAgent, InvalidName, OrchestratorError, RegistrationRefused, Result
from agent_sdk import Task
from agent_sdk.names import MAX_NAME_CHARS
from tests.conftest import ROOT, Cluster

#: How long a refused agent may take to stop: far less than any timeout it uses.
EXIT_S = 20.0

HOSTILE = {
    "empty": "",
    "too long": "n" * (MAX_NAME_CHARS + 1),
    "newline": "evil\n2024-01-01 INFO agent admin registered",
    "carriage return": "a\rb",
    "tab": "a\tb",
    "escape": "red\x1b[31m",
    "nul": "a\x00b",
    "del": "a\x7fb",
    "line separator": "a\u2028b",
}


class Named(BaseAgent):
    async def execute(self, task: Task) -> Result:
        return Result(task.data)


def assert_clear(error: Exception, what: str) -> None:
    message = str(error)
    assert isinstance(error, InvalidName) and isinstance(error, ValueError)
    assert isinstance(error, OrchestratorError)
    assert message.startswith(f"the agent's {what} "), message
    assert message.isprintable() and len(message) < 200, message


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_the_constructor_refuses_a_hostile_name_id_or_capability(kind: str) -> None:
    value = HOSTILE[kind]
    with pytest.raises(InvalidName) as name_error:
        Named(value, ["echo"])
    assert_clear(name_error.value, "name")
    with pytest.raises(InvalidName) as id_error:
        Named("named", ["echo"], agent_id=value)
    assert_clear(id_error.value, "id")
    with pytest.raises(InvalidName) as capability_error:
        Named("named", ["echo", value])
    assert_clear(capability_error.value, "capability")


def test_names_at_the_limit_are_taken_and_a_generated_id_stays_within_it() -> None:
    longest = "n" * MAX_NAME_CHARS
    agent = Named(longest, [longest, "ünïcode ok", "with space"])
    assert agent.name == longest and len(agent.agent_id) <= MAX_NAME_CHARS
    assert agent.agent_id.startswith("n" * 200)
    assert Named("named", agent_id=longest).agent_id == longest
    assert Named("named").agent_id.startswith("named-")


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_PURE_PYTHON": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=EXIT_S)


@pytest.mark.parametrize("option,value,what", [
    ("--name", "evil\nname", "name"),
    ("--name", "n" * (MAX_NAME_CHARS + 1), "name"),
    ("--capability", "", "capability"),
    ("--capability", "cap\x1b[2J", "capability"),
])
def test_agent_sdk_run_refuses_a_hostile_override_with_one_line(option: str, value: str,
                                                                what: str) -> None:
    # No broker listens there: the agent is refused before it connects
    done = run_agent("-m", "agent_sdk", "run", "tests.sample_agents:EchoAgent", option, value,
                     "--broker", "tcp://127.0.0.1:9")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: the agent's {what} "), line


def test_an_agent_the_broker_refuses_stops_with_registration_refused(cluster: Cluster) -> None:
    # Given a real broker, and an agent whose name the SDK's own check let through
    # (patched out below, as for a rule only the broker knows)
    broker = cluster.broker()
    name = "evil\nname"

    async def main() -> tuple[BaseException | None, BaseException | None]:
        import agent_sdk.agent as agent_module

        checks = agent_module.check_names
        agent_module.check_names = lambda *args: None  # type: ignore[assignment]
        try:
            agent = Named("ok", ["echo"])
            agent.name = name
            run = asyncio.create_task(agent.async_run(broker.url))
            registered = await asyncio.gather(agent.wait_registered(timeout=EXIT_S),
                                              return_exceptions=True)
            ran = await asyncio.gather(asyncio.wait_for(run, EXIT_S), return_exceptions=True)
        finally:
            agent_module.check_names = checks
        return registered[0], ran[0]

    # When it runs
    registered, ran = asyncio.run(main())
    # Then wait_registered and run both raise the broker's refusal, naming the field
    for error in (registered, ran):
        assert isinstance(error, RegistrationRefused), repr(error)
        assert error.code == "bad_request"
        message = str(error)
        assert message.startswith(f"the broker at {broker.url} refused the agent "
                                  "(bad_request): name 'evil\\nname'"), message
        assert "\n" not in message
    # And the broker holds no such agent
    assert cluster.client(broker.url).status()["agents"] == []


def test_agent_sdk_run_exits_with_one_line_when_the_broker_refuses(cluster: Cluster) -> None:
    broker = cluster.broker()
    done = run_agent("-m", "tests.sdk.test_sdk_names", broker.url)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # never said it registered
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: the broker at {broker.url} refused the agent "
                           "(bad_request): capability 'tab\\there'"), line


def _run_unchecked(url: str) -> Any:
    """``python -m agent_sdk run`` with the SDK's own name check patched out."""
    import agent_sdk.__main__ as cli
    import agent_sdk.agent as agent_module

    agent_module.check_names = cli.check_names = lambda *args: None  # type: ignore[assignment]
    return cli.main(["run", "tests.sample_agents:EchoAgent", "--capability", "tab\there",
                     "--broker", url])


if __name__ == "__main__":
    sys.exit(_run_unchecked(sys.argv[1]))
