"""How ``orchestrator status`` prints the status document for people: a summary, then
one row per agent.

Ids are never cut. On a terminal the agent table fits its width by dropping columns
(the least needed first, and the output says which), never by shortening a cell; the
id and circuit columns stay, and an id wraps whole only where even they do not fit. Piped or
redirected, the output has no width to fit: every column is printed at its full width.
"""

from __future__ import annotations

import io
import time
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

#: The agent table's columns: header, right-aligned.
AGENT_COLUMNS: Final = (
    ("name", False), ("id", False), ("circuit", False), ("state", False),
    ("capabilities", False), ("in flight", True), ("done", True), ("failed", True),
    ("latency ms", True), ("msgs lost", True),
)
#: The columns a narrow terminal drops, first dropped first; the id and the circuit
#: always show (an agent's id starts with its name, so the name goes last).
DROP_ORDER: Final = ("msgs lost", "latency ms", "failed", "done", "in flight",
                     "capabilities", "state", "name")
#: Where the width is measured: wide enough that nothing wraps.
_UNBOUNDED_WIDTH: Final = 100_000
_CIRCUIT_STYLES: Final = {"open": "bold red", "half_open": "yellow"}


def _agent_cells(agent: dict[str, Any]) -> dict[str, str]:
    """One agent's cells, by column header."""
    counters = agent.get("messaging") or {}
    lost = sum(counters.get(k, 0) for k in ("bus_gaps", "bus_overflow", "mailbox_dropped",
                                            "broker_refused"))
    return {
        "name": agent["name"], "id": agent["id"], "circuit": agent.get("circuit", "?"),
        "state": agent["state"], "capabilities": ", ".join(agent["capabilities"]),
        "in flight": f"{agent['in_flight']}/{agent['max_concurrent']}",
        "done": str(agent["done"]), "failed": str(agent["failed"]),
        "latency ms": f"{agent['latency_ms']:.2f}", "msgs lost": str(lost),
    }


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
        row = [Text(cells[header], style=_CIRCUIT_STYLES.get(cells[header], ""))
               if header == "circuit" else cells[header] for header, _ in shown]
        table.add_row(*row)
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
    head.add_row("queue", f"{status['queue']['pending']} pending "
                          f"(max {status['queue']['max_pending']})")
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
