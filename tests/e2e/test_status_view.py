"""``orchestrator status`` as people read it (the Observability issue): per agent its state,
health, circuit, in flight / max, done, failed and p50 latency, the queue by capability,
and ``--watch`` redrawing in place until Ctrl-C.

The watch runs against a real broker and a real agent process, on a real pseudo-terminal
(40 rows, 160 columns); every step waits for output with a deadline, never a sleep. The
rendering is checked on documents of this broker and of an older one without the new
fields (shown as ``?``).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from rich.console import Console

from cli.status_view import AGENT_COLUMNS, DROP_ORDER, print_status, status_view
from tests.conftest import ROOT, Cluster

#: How long a test waits for the output it expects.
DEADLINE_S = 20.0
#: How long the watch may take to end after Ctrl-C: a status call in progress returns
#: at once (KeyboardInterrupt), closing the client takes well under this.
EXIT_S = 5.0
ROWS, COLUMNS = 40, 160
AGENT = "watched-echo"
#: Terminal control sequences (cursor moves, colours, erase line) and carriage returns.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
SHOW_CURSOR = b"\x1b[?25h"


class PtyCommand:
    """``orchestrator ARGS`` running on a pseudo-terminal; the test reads what it drew."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {k: v for k, v in os.environ.items()
               if k not in ("COLUMNS", "LINES", "ORCH_BROKER", "NO_COLOR")}
        env.update(TERM="xterm-256color", PYTHONPATH=str(ROOT), ORCH_PURE_PYTHON="1")
        with _sigint_not_ignored():
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT,
                                         stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)  # the child holds it: reading the master then ends in EIO at exit
        self.master = master
        self.raw = b""
        self.ended = False

    @property
    def text(self) -> str:
        """Everything drawn so far, without the terminal's control sequences."""
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def read_until(self, done: Callable[[], bool], what: str,
                   timeout: float = DEADLINE_S) -> None:
        """Read the output until ``done()`` holds; fail at the deadline or at its end."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if self.ended or left <= 0:
                raise AssertionError(f"{what}: not within {timeout} s; output:\n{self.text}")
            self._read(left)

    def _read(self, timeout: float) -> None:
        """What the command wrote within ``timeout`` seconds, added to :attr:`raw`."""
        if not select.select([self.master], [], [], timeout)[0]:
            return
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the command ended and the terminal closed
            chunk = b""
        self.raw += chunk
        self.ended = not chunk

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, as the terminal sends it; the exit code, read to the end."""
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + EXIT_S
        while not self.ended and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_S)
        os.close(self.master)


@contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Start children with SIGINT at its default, as a shell's foreground command has it.

    A process started with SIGINT ignored (pytest run in the background of a script)
    passes that on through exec, and then Ctrl-C would not reach the watch at all. A
    handler, unlike SIG_IGN, is reset to the default by exec; set in the parent's main
    thread, rather than in a preexec_fn, which is unsafe with the clients' threads.
    """
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if before is signal.SIG_IGN:
            signal.signal(signal.SIGINT, before)


@pytest.fixture
def watched(cluster: Cluster) -> Iterator[tuple[Cluster, Any, PtyCommand]]:
    """A broker with one echo agent that ran one task, and `status --watch` watching it."""
    broker = cluster.broker()
    cluster.agent(broker.url, agent_name=AGENT, agent_caps="echo")
    client = cluster.client(broker.url)
    client.wait_for_agents(1, name=AGENT, timeout=DEADLINE_S)
    assert client.submit(capabilities=["echo"], data="hi").result(timeout=DEADLINE_S).ok
    watch = PtyCommand(["--broker", broker.url, "status", "--watch"])
    try:
        yield cluster, broker, watch
    finally:
        watch.close()


def agent_cells(text: str) -> dict[str, str] | None:
    """The cells of the last row drawn for :data:`AGENT` (the watch redraws it every
    second), by column header; None before the table was drawn."""
    # Complete lines only: the last one may be half read, its cells not all there yet.
    complete = text[:text.rfind("\n") + 1]
    if not any(f"│ {AGENT} " in line for line in complete.splitlines()):
        return None
    return cells_by_agent(complete).get(AGENT)


def test_watch_draws_the_agent_with_its_health_and_ends_cleanly_on_ctrl_c(
        watched: tuple[Cluster, Any, PtyCommand]) -> None:
    _, _, watch = watched
    # When `status --watch` has drawn the agent table, health column included
    watch.read_until(lambda: (agent_cells(watch.text) or {}).get("health") == "healthy",
                     "the agent's row with its health")
    # Then the row has the agent's state, health, circuit, in flight / max, done, p50
    shown = agent_cells(watch.text) or {}
    assert shown["circuit"] == "closed" and shown["state"] == "ready", shown
    assert shown["in flight"] == "0/16" and shown["done"] == "1", shown
    assert shown["failed"] == "0" and re.fullmatch(r"\d+\.\d\d", shown["p50 ms"]), shown
    assert re.search(r"queue +0 pending \(max \d+\)", watch.text), watch.text
    # When Ctrl-C is pressed
    code = watch.interrupt()
    # Then it exits 0 at once, without a traceback, the cursor shown again
    assert code == 0, watch.text
    assert "Traceback" not in watch.text and "Aborted" not in watch.text, watch.text
    assert SHOW_CURSOR in watch.raw, watch.raw


def test_watch_says_in_place_when_the_broker_stops_answering_and_keeps_asking(
        watched: tuple[Cluster, Any, PtyCommand]) -> None:
    _, broker, watch = watched
    watch.read_until(lambda: agent_cells(watch.text) is not None, "the agent's row")
    # When the broker dies under the watch
    broker.sigkill()
    # Then the watch says so, on one line, and goes on
    watch.read_until(lambda: "is not answering" in watch.text, "the broker lost")
    lost = [line for line in watch.text.splitlines() if "is not answering" in line]
    assert broker.url in lost[0] and "still asking" in lost[0], lost
    assert watch.proc.poll() is None, watch.text
    # And Ctrl-C still ends it with 0, even in the middle of a status call left unanswered
    code = watch.interrupt()
    assert code == 0, watch.text
    assert "Traceback" not in watch.text, watch.text


def test_watch_with_json_is_a_usage_error() -> None:
    # When --watch and --json are given together (no broker needed: it fails before)
    done = subprocess.run([sys.executable, "-m", "cli", "status", "--watch", "--json"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)
    # Then it is exit 2, one line on stderr, one JSON document on stdout
    assert done.returncode == 2, done
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: "), done
    assert "--watch" in done.stderr and "--json" in done.stderr
    assert json.loads(done.stdout)["exit_code"] == 2


# ------------------------------------------------------------------ rendering


def document(*, new_fields: bool) -> dict[str, Any]:
    """A status document of this broker (``new_fields``) or of an older one."""
    agents: list[dict[str, Any]] = [
        {"id": "reviewer-0a1b2c3d4e", "name": "reviewer", "capabilities": ["review"],
         "state": "ready", "circuit": "closed", "in_flight": 2, "max_concurrent": 4,
         "done": 7, "failed": 1, "latency_ms": 3.25, "messaging": {},
         "health": "healthy", "health_detail": None, "p50_ms": 12.5},
        {"id": "research-5f6a7b8c9d", "name": "research", "capabilities": ["research"],
         "state": "ready", "circuit": "open", "in_flight": 0, "max_concurrent": 1,
         "done": 0, "failed": 3, "latency_ms": 0.0, "messaging": {},
         "health": "unhealthy", "health_detail": "ping raised ValueError", "p50_ms": None},
        {"id": "coder-1122334455", "name": "coder", "capabilities": ["code", "debugging"],
         "state": "busy", "circuit": "half_open", "in_flight": 1, "max_concurrent": 1,
         "done": 2, "failed": 0, "latency_ms": 1.0, "messaging": {},
         "health": "unresponsive", "health_detail": "no pong for 3 s", "p50_ms": 1.0},
    ]
    queue: dict[str, Any] = {"pending": 4, "max_pending": 100000,
                             "by_capability": {"research": 1, "review": 2, "": 1}}
    if not new_fields:
        for agent in agents:
            for key in ("health", "health_detail", "p50_ms"):
                del agent[key]
        del queue["by_capability"]
    return {"broker": {"endpoint": "tcp://127.0.0.1:5555", "pid": 1, "state": "running",
                       "uptime_s": 1.0, "policy": "capability"},
            "storage": {"state": "ok", "data_dir": "/data"}, "agents": agents,
            "queue": queue, "tasks": {"submitted": 14}, "errors": {}}


def rendered(status: dict[str, Any], width: int, terminal: bool = True) -> str:
    """``status`` as ``orchestrator status`` prints it on a terminal ``width`` wide (or
    piped), colours kept as escape sequences when on a terminal."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system="truecolor"
                      if terminal else None)
    print_status(status, "/data", console)
    return out.getvalue()


def cells_by_agent(text: str) -> dict[str, dict[str, str]]:
    """The agent table's cells, by agent name, then by column header: each row read with
    the header drawn last above it (the watch draws a table per refresh), the last row of
    an agent winning; a row whose cells do not match its header (cut short) is skipped."""
    found: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for line in ANSI.sub("", text).splitlines():
        if line.startswith("┃") and "circuit" in line:
            columns = [cell.strip() for cell in line.strip("┃ ").split("┃")]
        elif line.startswith("│") and columns:
            row = [cell.strip() for cell in line.strip("│ ").split("│")]
            if len(row) == len(columns):
                found[row[columns.index("name")]] = dict(zip(columns, row, strict=True))
    return found


def test_the_table_shows_health_with_its_detail_p50_and_the_queue_by_capability() -> None:
    text = rendered(document(new_fields=True), 200)
    agents = cells_by_agent(text)
    assert [name for name, _ in AGENT_COLUMNS if name in agents["reviewer"]] == \
        [name for name, _ in AGENT_COLUMNS]
    assert agents["reviewer"]["health"] == "healthy"
    assert agents["research"]["health"] == "unhealthy: ping raised ValueError"
    assert agents["coder"]["health"] == "unresponsive: no pong for 3 s"
    assert (agents["reviewer"]["p50 ms"], agents["research"]["p50 ms"]) == ("12.50", "-")
    assert (agents["reviewer"]["in flight"], agents["reviewer"]["done"],
            agents["reviewer"]["failed"], agents["coder"]["state"]) == ("2/4", "7", "1", "busy")
    assert (agents["research"]["circuit"], agents["coder"]["circuit"]) == ("open", "half_open")
    # The most pending first; the tasks that ask for no capability are "(any)"
    assert re.search(r"^queue +4 pending \(max 100000\): review 2, \(any\) 1, research 1 *$",
                     ANSI.sub("", text), re.MULTILINE), text
    # Styled by how bad: unhealthy bold red (1;31), unresponsive yellow (33)
    assert re.search(r"\x1b\[1;31munhealthy: ping raised ValueError", text), repr(text)
    assert re.search(r"\x1b\[33munresponsive: no pong for 3 s", text), repr(text)


def test_an_older_brokers_document_shows_question_marks_and_no_breakdown() -> None:
    piped = rendered(document(new_fields=False), 80, terminal=False)
    agents = cells_by_agent(piped)
    assert {agent["health"] for agent in agents.values()} == {"?"}
    assert {agent["p50 ms"] for agent in agents.values()} == {"?"}
    assert re.search(r"^queue +4 pending \(max 100000\)$", piped, re.MULTILINE), piped


def test_markup_in_a_health_detail_prints_as_itself() -> None:
    status = document(new_fields=True)
    status["agents"][1]["health_detail"] = "ping raised [bold]KeyError\n'x'"
    status["queue"]["by_capability"] = {"[red]x": 4}
    text = rendered(status, 200, terminal=False)
    agents = cells_by_agent(text)
    assert agents["research"]["health"] == r"unhealthy: ping raised [bold]KeyError\n'x'"
    assert re.search(r"^queue +4 pending \(max 100000\): \[red\]x 4$", text, re.MULTILINE)


@pytest.mark.parametrize("width", [44, 60, 80, 100, 120])
def test_a_narrow_terminal_keeps_health_longest_after_id_and_circuit(width: int) -> None:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, no_color=True).print(
        status_view(document(new_fields=True), "/data", width))
    text = ANSI.sub("", out.getvalue())
    assert max(map(len, text.splitlines())) <= width and "…" not in text
    header = next(line for line in text.splitlines() if "circuit" in line)
    kept = [name for name, _ in AGENT_COLUMNS if re.search(rf"[┃│] {name} +[┃│]", header)]
    left_out = [name for name, _ in AGENT_COLUMNS if name not in kept]
    # Columns go in DROP_ORDER: health only once every other droppable one went
    assert set(left_out) == set(DROP_ORDER[:len(left_out)]), (left_out, header)
    assert "health" in kept or set(left_out) == set(DROP_ORDER)
