"""``orchestrator events``: a live tail of the broker's events on the pub/sub bus.

The broker publishes agents joining, leaving, changing health or circuit (``agents.*``) and
task state changes (``tasks.<id>``); workflow runs publish their steps on
``workflow.<run id>``. This command subscribes to those prefixes and prints each event
as it comes: one readable line, or with ``--json`` one JSON object per line, flushed per
event so that a pipe sees it at once. Once every subscription is confirmed it prints
``{"event": "subscribed"}`` on stderr, which a script can wait for before acting.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import click
import orjson

from wire.bus import BUS_PEER_REFUSED, BUS_POOL
from cli.common import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    NAME,
    PING_TIMEOUT_S,
    Context,
    DataDirCommand,
    count,
    fail,
    one_line,
)

#: The bus prefixes the command subscribes to.
TOPICS: Final = ("agents.", "tasks.", "workflow.")
#: The event types, as ``--type`` takes them.
EVENT_TYPES: Final = ("agent_joined", "agent_left", "agent_health", "agent_circuit",
                      "agent_refused", "pool", "task_state", "task_failed", "workflow")
#: Bus topics of agent events and their event types.
_AGENT_TOPICS: Final = {"agents.joined": "agent_joined", "agents.left": "agent_left",
                        "agents.health": "agent_health", "agents.circuit": "agent_circuit"}
#: Task states that are a failure (``task_failed`` rather than ``task_state``).
FAILED_STATES: Final = frozenset({"failed", "timed_out", "rejected"})
#: Exit code of an interrupted tail (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED: Final = 130


@dataclass(slots=True)
class Event:
    """One bus message as this command shows it.

    ``agent`` is the agent's name when known (joins give it; task events give an id);
    ``details`` is what the type adds (state and attempt, capabilities, a workflow
    step's fields).
    """

    type: str
    at: float
    topic: str
    seq: int
    agent: str | None = None
    agent_id: str | None = None
    task_id: str | None = None
    capabilities: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Filters:
    """What ``--type``, ``--agent`` and ``--capability`` keep (empty: everything)."""

    types: frozenset[str]
    agent: str | None
    capability: str | None

    def keep(self, event: Event) -> bool:
        """Whether ``event`` passes every filter given."""
        if self.types and event.type not in self.types:
            return False
        if self.agent is not None and self.agent not in (event.agent, event.agent_id):
            return False
        return self.capability is None or self.capability in event.capabilities


class AgentBook:
    """Names and capabilities of the agents seen joining, by id: task events carry only
    the agent's id, and ``--agent NAME`` / ``--capability`` filter them through this."""

    def __init__(self) -> None:
        self._agents: dict[str, tuple[str, list[str]]] = {}

    def learn(self, agents: list[dict[str, Any]]) -> None:
        """Take the agents of the broker's status document (those already running)."""
        for agent in agents:
            if isinstance(agent, dict) and isinstance(agent.get("id"), str):
                self._agents[agent["id"]] = (str(agent.get("name", "")),
                                             [str(c) for c in agent.get("capabilities", ())])

    def _lookup(self, agent: Any) -> tuple[str | None, str | None, list[str]]:
        """Id, name and capabilities of a task event's agent: the event names it by id,
        or (on a task's final state) sometimes by name, which maps back to its id."""
        if not isinstance(agent, str):
            return None, None, []
        if agent in self._agents:
            name, caps = self._agents[agent]
            return agent, name, caps
        for agent_id, (name, caps) in self._agents.items():
            if name == agent:
                return agent_id, name, caps
        return agent, None, []

    def event(self, topic: str, seq: int, data: Any) -> Event:
        """The :class:`Event` of a bus message (``data`` as the publisher sent it)."""
        data = data if isinstance(data, dict) else {"data": data}
        at = float(data.get("at") or datetime.datetime.now().timestamp())
        if topic == BUS_PEER_REFUSED:
            # A secure broker refused a peer (a key, a routing id): who, and why.
            return Event("agent_refused", at, topic, seq, None, str(data.get("peer", "")),
                         None, [], {"reason": data.get("reason")})
        if topic == BUS_POOL:
            # Agent pools: a node joined, was lost or came back, a scale, a crash loop.
            agent = data.get("agent")
            return Event("pool", at, topic, seq, str(agent) if agent else None, None, None,
                         [], {k: v for k, v in data.items() if k not in ("agent", "at")})
        if topic in _AGENT_TOPICS:
            agent_id = str(data.get("id", ""))
            name = str(data.get("name", ""))
            caps = [str(c) for c in data.get("capabilities", ())]
            self._agents[agent_id] = (name, caps)
            details = {k: data[k] for k in ("reason", "health", "detail", "circuit")
                       if k in data}
            return Event(_AGENT_TOPICS[topic], at, topic, seq, name, agent_id, None, caps,
                         details)
        if topic.startswith("tasks."):
            state = str(data.get("state", ""))
            task_agent, agent_name, caps = self._lookup(data.get("agent"))
            return Event("task_failed" if state in FAILED_STATES else "task_state", at, topic,
                         seq, agent_name, task_agent, str(data.get("task_id", topic[6:])), caps,
                         {"state": state, "attempt": data.get("attempt")})
        details = {k: v for k, v in data.items() if k not in ("at",)}
        return Event("workflow", at, topic, seq, None, None, None, [], details)


def readable(event: Event) -> str:
    """One line for a person: time, type, agent, task, details."""
    when = datetime.datetime.fromtimestamp(event.at).strftime("%H:%M:%S.%f")[:-3]
    parts = [when, f"{event.type:<12}", event.agent or event.agent_id or "-",
             event.task_id or "-"]
    parts += [f"{k}={v}" for k, v in event.details.items() if v is not None]
    if event.capabilities and event.type.startswith("agent_"):
        parts.append("capabilities=" + ",".join(event.capabilities))
    return one_line(" ".join(parts))


async def tail(url: str, filters: Filters, as_json: bool, limit: int | None) -> tuple[str, int]:
    """Subscribe and print events until ``limit`` of them passed the filters.

    Returns:
        ("", 0) after ``limit`` events, else the one-line error and its exit code.
    """
    from agent_sdk import BrokerUnavailable, BusUnavailable, Client, WaitTimeout

    # The SDK's warnings (no bus, reconnecting) would reach stderr through logging's
    # last resort; this command reports what matters in its own one line.
    logging.getLogger("agent_sdk").addHandler(logging.NullHandler())
    client = Client(url)
    try:
        await client.connect()
        await client.ping(PING_TIMEOUT_S)
    except BrokerUnavailable:
        await client.close()
        return "unreachable", EXIT_UNREACHABLE
    book = AgentBook()
    queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
    try:
        try:
            book.learn(list((await client.status()).get("agents", ()) or ()))
        except (BrokerUnavailable, AttributeError, TypeError):
            pass  # names then come from joins only
        subs = [client.subscribe(t, lambda m: queue.put_nowait((m.topic, m.seq, m.data)))
                for t in TOPICS]
        try:
            for sub in subs:
                await sub.confirm()
        except BusUnavailable:
            return (f"the broker at {url} runs no pub/sub bus (started with --no-bus); "
                    "there are no events to tail"), EXIT_FAILED
        except WaitTimeout:
            return f"the bus of the broker at {url} did not confirm a subscription", \
                EXIT_UNREACHABLE
        sys.stderr.write('{"event": "subscribed"}\n')
        sys.stderr.flush()
        shown = 0
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def interrupted() -> None:
            if not stop.done():
                stop.set_result(None)

        # Set here rather than left to KeyboardInterrupt: a clean exit, and a tail
        # started in the background of a script (SIGINT ignored) still stops on it.
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted)
        while limit is None or shown < limit:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait((getter, stop), return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return "interrupted", EXIT_INTERRUPTED
            topic, seq, data = getter.result()
            if topic.startswith("_") or ".probe" in topic:
                continue
            event = book.event(topic, seq, data)
            if not filters.keep(event):
                continue
            line = orjson.dumps(asdict(event), default=str).decode() if as_json \
                else readable(event)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            shown += 1
        return "", 0
    finally:
        await client.close()


@click.command("events", cls=DataDirCommand)
@click.option("--type", "types", type=click.Choice(EVENT_TYPES), multiple=True,
              help="Only events of this type (repeatable).")
@click.option("--agent", type=NAME, default=None,
              help="Only events of this agent (its name or id).")
@click.option("--capability", type=NAME, default=None,
              help="Only events of agents with this capability.")
@click.option("--count", "limit", type=count(), default=None,
              help="Exit after this many events (default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per event per line: type, at, topic, seq, agent, "
                   "agent_id, task_id, capabilities, details.")
@click.pass_obj
def events(obj: Context, types: tuple[str, ...], agent: str | None, capability: str | None,
           limit: int | None, as_json: bool) -> None:
    """Tail the broker's events live: agents joining and leaving, their health and
    circuit changes, task state changes and failures, workflow steps. Runs until Ctrl-C
    (exit 130) or --count events.

    Prints {"event": "subscribed"} on stderr once listening. The bus drops events for a
    subscriber that lags: this is for watching, not an audit trail.
    """
    from agent_sdk.loop import run as run_loop

    url = obj.broker_url
    filters = Filters(frozenset(types), agent, capability)
    try:
        message, code = run_loop(tail(url, filters, as_json, limit))
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.exit(EXIT_INTERRUPTED)
    if code == EXIT_INTERRUPTED:
        sys.exit(EXIT_INTERRUPTED)
    if code == EXIT_UNREACHABLE and message == "unreachable":
        fail(obj.unreachable_message(url), EXIT_UNREACHABLE)
    if code:
        fail(message, code)
