"""How ``orchestrator status`` prints the status document for people: a summary, then
one row per agent (state, health, circuit, in flight / max, done, failed, p50 latency), and
the queue by capability.

A field an older broker does not send shows as ``?`` (the queue's breakdown by capability
is then left out): the CLI reads a broker of any release it can talk to.

Ids are never cut. On a terminal the agent table fits its width by dropping columns
(the least needed first, and the output says which), never by shortening a cell; the
id and circuit columns stay, health goes last, and an id wraps whole only where even they
do not fit. Piped or redirected, the output has no width to fit: every column is printed
at its full width.
"""

from __future__ import annotations

import io
import time
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.common import one_line

#: The agent table's columns: header, right-aligned. "p50 ms" (the median task duration)
#: replaced the EWMA "latency ms": a median is what people compare, and one slow task
#: does not move it; the EWMA is still in ``status --json`` (``latency_ms``).
AGENT_COLUMNS: Final = (
    ("name", False), ("id", False), ("circuit", False), ("health", False), ("state", False),
    ("capabilities", False), ("in flight", True), ("done", True), ("failed", True),
    ("p50 ms", True), ("msgs lost", True),
)
#: The columns a narrow terminal drops, first dropped first; the id and the circuit
#: always show. Health goes last: like the circuit, it says why an agent gets no work;
#: the name goes just before it, as an agent's id starts with its name.
DROP_ORDER: Final = ("msgs lost", "p50 ms", "failed", "done", "in flight",
                     "capabilities", "state", "name", "health")
#: Where the width is measured: wide enough that nothing wraps.
_UNBOUNDED_WIDTH: Final = 100_000
_CIRCUIT_STYLES: Final = {"open": "bold red", "half_open": "yellow"}
_HEALTH_STYLES: Final = {"unresponsive": "yellow", "unhealthy": "bold red"}
#: What a cell shows when the broker's document lacks its field (an older broker).
UNKNOWN: Final = "?"
#: How the queue names the tasks that ask for no capability (their label is "").
ANY_CAPABILITY: Final = "(any)"


def _health_cell(agent: dict[str, Any]) -> Text:
    """The health, and after it why the agent is not healthy, styled by how bad it is."""
    health = agent.get("health")
    if health is None:
        return Text(UNKNOWN)
    detail = agent.get("health_detail")
    # The detail may quote an agent's exception message: one line, whatever it holds.
    shown = f"{health}: {one_line(str(detail))}" if detail else str(health)
    return Text(shown, style=_HEALTH_STYLES.get(str(health), ""))


def _p50_cell(agent: dict[str, Any]) -> str:
    """The median task duration in ms: ``-`` before any task, ``?`` from an older broker."""
    if "p50_ms" not in agent:
        return UNKNOWN
    p50 = agent["p50_ms"]
    return "-" if p50 is None else f"{p50:.2f}"


def _agent_cells(agent: dict[str, Any]) -> dict[str, Text]:
    """One agent's cells, by column header.

    Every cell is a :class:`Text`, so that a bracket in a name or a health detail prints
    as itself and is never read as rich markup.
    """
    counters = agent.get("messaging") or {}
    lost = sum(counters.get(k, 0) for k in ("bus_gaps", "bus_overflow", "mailbox_dropped",
                                            "broker_refused"))
    circuit = str(agent.get("circuit", UNKNOWN))
    cells = {
        "name": agent["name"], "id": agent["id"], "state": agent["state"],
        "capabilities": ", ".join(agent["capabilities"]),
        "in flight": f"{agent['in_flight']}/{agent['max_concurrent']}",
        "done": str(agent["done"]), "failed": str(agent["failed"]),
        "p50 ms": _p50_cell(agent), "msgs lost": str(lost),
    }
    return {**{header: Text(str(value)) for header, value in cells.items()},
            "circuit": Text(circuit, style=_CIRCUIT_STYLES.get(circuit, "")),
            "health": _health_cell(agent)}


def agent_table(agents: list[dict[str, Any]], hidden: tuple[str, ...] = ()) -> Table:
    """The agents, one row each, without the ``hidden`` columns.

    Args:
        agents: The status document's ``agents``.
        hidden: Headers of the columns to leave out.

    Returns:
        The table; text cells wrap whole ("fold") rather than end in an ellipsis.
    """
    table = Table(title=f"{len(agents)} agent(s)", title_justify="left")
    shown = [(header, right) for header, right in AGENT_COLUMNS if header not in hidden]
    # The id column gives way last: other columns wrap first.
    longest_id = max((len(agent["id"]) for agent in agents), default=2)
    for header, right in shown:
        table.add_column(header, justify="right" if right else "left", no_wrap=right,
                         overflow="fold", min_width=longest_id if header == "id" else None)
    for agent in agents:
        cells = _agent_cells(agent)
        table.add_row(*(cells[header] for header, _ in shown))
    return table


def _storage_line(storage: dict[str, Any]) -> Text:
    """The storage row: ``ok``, or why new tasks are refused."""
    if storage.get("state", "ok") == "ok":
        return Text("ok (the journal writes)")
    since = time.strftime("%H:%M:%S", time.localtime(storage["since"])) \
        if storage.get("since") else "?"
    return Text(f"FULL since {since}: {storage.get('message')}; new tasks are refused "
                f"(storage_full, {storage.get('refused_tasks', 0)} so far), the tasks held "
                "are still served, and new ones are accepted once a write succeeds",
                style="bold red")


def queue_line(queue: dict[str, Any]) -> str:
    """The queue row: ``3 pending (max 100000): review 2, research 1``.

    The breakdown lists the capabilities the most pending tasks ask for first, and is
    left out when the broker sends none (an older broker) or nothing is pending.
    """
    line = f"{queue['pending']} pending (max {queue['max_pending']})"
    by_capability: dict[str, int] = queue.get("by_capability") or {}
    if not by_capability:
        return line
    ranked = sorted(by_capability.items(), key=lambda item: (-item[1], item[0]))
    return line + ": " + ", ".join(f"{label or ANY_CAPABILITY} {count}"
                                   for label, count in ranked)


def summary(status: dict[str, Any], data_dir: str) -> Table:
    """The summary above the agent table: broker, data dir, storage, queue, counts."""
    broker = status["broker"]
    storage = status.get("storage") or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")  # an endpoint or a path wraps whole, never cut
    head.add_row("broker", f"{broker['endpoint']}  pid {broker['pid']}  {broker['state']}  "
                 f"up {broker['uptime_s']:.0f} s  policy {broker['policy']}")
    head.add_row("data dir", storage.get("data_dir") or data_dir)
    if storage:
        head.add_row("storage", _storage_line(storage))
    head.add_row("queue", Text(queue_line(status["queue"])))  # a label is not markup
    head.add_row("tasks", "  ".join(f"{k} {v}" for k, v in status["tasks"].items()))
    if status.get("errors"):
        head.add_row("errors", "  ".join(f"{k} {v}" for k, v in status["errors"].items()))
    messaging = status.get("messaging") or {}
    if messaging.get("bus"):
        bus = messaging["bus"]
        head.add_row("bus", f"out {bus['out']}  in {bus['in']}  "
                            f"{bus['subscribed_prefixes']} subscribed prefix(es)")
    if messaging.get("direct"):
        head.add_row("direct", "  ".join(f"{k} {v}" for k, v in messaging["direct"].items()))
    llm = status.get("llm")
    if llm:
        total = llm["total"]
        per_agent = "  ".join(f"{a.get('agent', '?')} {a.get('total_tokens', 0)}"
                              for a in llm["agents"])
        head.add_row("llm tokens", f"{total['total_tokens']} in {total['calls']} call(s)"
                     + (f"  ({per_agent})" if per_agent else ""))
        for budget in llm["budgets"]:
            head.add_row("token budget", f"{budget['scope']}  {budget['spent']} of "
                                         f"{budget['max_tokens']}")
    runner = status.get("runner")
    if runner:
        head.add_row("workflow runner", f"pid {runner['pid']}  "
                     + ("running" if runner["running"] else "not running (see runner.log)"))
    return head


def natural_width(renderable: RenderableType) -> int:
    """How wide ``renderable`` is when nothing needs to wrap."""
    console = Console(file=io.StringIO(), width=_UNBOUNDED_WIDTH)
    return console.measure(renderable).maximum


def status_view(status: dict[str, Any], data_dir: str, width: int | None) -> Group:
    """The status document for people.

    Args:
        status: The broker's status document.
        data_dir: The data dir the CLI looked in (shown when the broker names none).
        width: The terminal's width to fit, or None to print every column in full.

    Returns:
        The summary and the agent table, with a note naming the columns left out.
    """
    hidden: tuple[str, ...] = ()
    agents = agent_table(status["agents"])
    while width is not None and len(hidden) < len(DROP_ORDER) and \
            natural_width(agents) > width:
        hidden = DROP_ORDER[:len(hidden) + 1]
        agents = agent_table(status["agents"], hidden)
    parts: list[RenderableType] = [summary(status, data_dir), agents]
    if hidden:
        parts.append(Text(f"(left out to fit {width} columns: {', '.join(hidden)}; "
                          "`orchestrator status --json` has every field)", style="dim"))
    return Group(*parts)


def print_status(status: dict[str, Any], data_dir: str, console: Console | None = None) -> None:
    """Print the status: fitted to the terminal, or at full width when piped.

    Args:
        status: The broker's status document.
        data_dir: The data dir the CLI looked in.
        console: Where to print (a terminal's width is fitted); default stdout.
    """
    console = console or Console()
    if console.is_terminal:
        console.print(status_view(status, data_dir, console.width))
        return
    view = status_view(status, data_dir, None)
    # Not a terminal: no width to fit, so none that would cut or wrap anything; and no
    # padding after the last character of a line (a table pads its cells).
    buffer = io.StringIO()
    Console(file=buffer, width=max(natural_width(view), 1), no_color=True,
            highlight=False).print(view)
    console.file.write("".join(f"{line.rstrip()}\n"
                               for line in buffer.getvalue().splitlines()))
