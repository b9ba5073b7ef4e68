"""Which data dir every command uses, and ``status`` as people read it (issue 11).

The data dir is ``$ORCH_HOME``, else ``./.orchestrator`` where it exists, else the
per-user ``$XDG_STATE_HOME/orchestrator`` (``~/.local/state/orchestrator``): so ``status``
from any directory finds the user's running broker. Every ``--help`` and ``status`` say
which one. The status table shows each agent's circuit, and never cuts an id: a narrow
terminal loses columns, a pipe gets them all.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from wire.home import home_dir, locate_home
from cli.main import main
from cli.status_view import AGENT_COLUMNS, DROP_ORDER, status_view
from tests.conftest import ROOT

CLI_TIMEOUT_S = 60
#: An agent name long enough that a full agent table does not fit a narrow terminal.
AGENT_NAME = "summarizer-long"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def cli(*args: str, env: dict[str, str], cwd: Path = ROOT,
        **options: Any) -> subprocess.CompletedProcess[str]:
    """``orchestrator ARGS`` in ``cwd`` with exactly ``env`` (plus PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, text=True,
                          timeout=CLI_TIMEOUT_S, **options)


# ------------------------------------------------------------------ which data dir


def test_every_test_runs_with_a_temporary_orch_home(orch_home: Path) -> None:
    assert os.environ["ORCH_HOME"] == str(orch_home)
    assert home_dir() == orch_home and locate_home()[1] == "from ORCH_HOME"


def test_the_data_dir_is_orch_home_then_the_local_one_then_the_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no ORCH_HOME, a HOME and a directory without ./.orchestrator
    monkeypatch.delenv("ORCH_HOME")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    # Then it is the per-user directory
    assert locate_home() == (tmp_path / "user/.local/state/orchestrator",
                             "the per-user default")
    # And XDG_STATE_HOME moves it, when absolute (a relative one is ignored, as XDG says)
    monkeypatch.setenv("XDG_STATE_HOME", "relative")
    assert home_dir() == tmp_path / "user/.local/state/orchestrator"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert home_dir() == tmp_path / "xdg/orchestrator"
    # And ./.orchestrator wins where it exists
    (tmp_path / ".orchestrator").mkdir()
    assert locate_home() == (tmp_path / ".orchestrator",
                             "./.orchestrator exists in the current directory")
    # And ORCH_HOME wins over both
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "explicit"))
    assert home_dir() == tmp_path / "explicit"


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every command and group under ``group``, the group itself first."""
    yield path
    ctx = click.Context(group)  # (the top-level group imports its commands on use)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.parametrize("path", list(commands(main)), ids=lambda p: " ".join(p) or "main")
def test_every_help_names_the_data_dir(path: tuple[str, ...], orch_home: Path) -> None:
    shown = CliRunner().invoke(main, [*path, "--help"], env={"ORCH_HOME": str(orch_home)},
                               terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"Data dir: {orch_home} (from ORCH_HOME)." in shown.output


@pytest.fixture
def user_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with no ORCH_HOME and a HOME of its own: the per-user data dir."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORCH_HOME", "XDG_STATE_HOME", "ORCH_BROKER")}
    env["HOME"] = str(tmp_path / "user")
    yield env
    cli("stop", env=env, capture_output=True)


def test_status_from_any_directory_finds_the_running_default_broker(
        tmp_path: Path, user_env: dict[str, str]) -> None:
    # Given a broker started from one directory with no data dir option
    here, elsewhere = tmp_path / "project", tmp_path / "somewhere/else"
    here.mkdir()
    elsewhere.mkdir(parents=True)
    started = cli("start", "--bind", "127.0.0.1:0", "--no-state", "--no-bus", "--no-agents", "--json",
                  env=user_env, cwd=here, capture_output=True)
    assert started.returncode == 0, started.stderr
    data_dir = tmp_path / "user/.local/state/orchestrator"
    assert json.loads(started.stdout)["home"] == str(data_dir)
    # When status runs from another directory
    status = cli("status", "--json", env=user_env, cwd=elsewhere, capture_output=True)
    # Then it finds that broker, and says which data dir it is
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["storage"]["data_dir"] == str(data_dir)
    table = cli("status", env=user_env, cwd=elsewhere, capture_output=True)
    assert re.search(rf"^data dir +{re.escape(str(data_dir))}$", table.stdout, re.M), \
        table.stdout
    # And `--help` there names it too
    shown = cli("status", "--help", env=user_env, cwd=elsewhere, capture_output=True)
    assert f"Data dir: {data_dir} (the per-user default).\n" in shown.stdout


# ------------------------------------------------------------------ the status table


def fake_status(agent_ids: list[str]) -> dict[str, Any]:
    agents: list[dict[str, Any]] = [
        {"id": agent_id, "name": agent_id.rsplit("-", 1)[0], "capabilities": ["echo"],
         "state": "ready", "circuit": "open" if i else "closed", "in_flight": 0,
         "max_concurrent": 16, "done": 3, "failed": 1, "latency_ms": 1.5, "messaging": {}}
        for i, agent_id in enumerate(agent_ids)]
    return {"broker": {"endpoint": "tcp://127.0.0.1:5555", "pid": 1, "state": "running",
                       "uptime_s": 1.0, "policy": "capability"},
            "storage": {"state": "ok", "data_dir": "/data"}, "agents": agents,
            "queue": {"pending": 0, "max_pending": 10}, "tasks": {"submitted": 4},
            "errors": {}}


@pytest.mark.parametrize("width", [44, 60, 80, 100, 140])
def test_a_narrow_table_drops_columns_and_never_cuts_an_id(width: int) -> None:
    ids = [f"{AGENT_NAME}-0123456789", f"{AGENT_NAME}-abcdef0123"]
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, no_color=True).print(
        status_view(fake_status(ids), "/data", width))
    text = ANSI.sub("", out.getvalue())
    lines = text.splitlines()
    assert "…" not in text and max(map(len, lines)) <= width
    assert all(any(agent_id in line for line in lines) for agent_id in ids), text
    header = next(line for line in lines if "circuit" in line)
    assert "open" in text and "closed" in text
    kept = [name for name, _ in AGENT_COLUMNS if name in header]
    assert set(kept) >= {"id", "circuit"}
    # Columns go in DROP_ORDER, and the output says which
    left_out = [name for name, _ in AGENT_COLUMNS if name not in kept]
    assert left_out == [name for name, _ in AGENT_COLUMNS if name in DROP_ORDER[:len(left_out)]]
    assert ("left out to fit" in text) == bool(left_out)


@pytest.fixture
def two_agents(orch_home: Path) -> Iterator[list[str]]:
    """A broker started with two agents named :data:`AGENT_NAME`; their ids."""
    env = {**os.environ, "AGENT_NAME": AGENT_NAME}
    started = cli("start", "--bind", "127.0.0.1:0", "--no-state", "--no-bus", "--agents",
                  "tests.sample_agents:EchoAgent=2", "--json", env=env, capture_output=True)
    try:
        assert started.returncode == 0, started.stderr
        yield json.loads(started.stdout)["agents"]
    finally:
        cli("stop", env=dict(os.environ), capture_output=True)


def run_in_pty(args: list[str], columns: int) -> str:
    """Run ``orchestrator ARGS`` on a pseudo-terminal ``columns`` wide; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    env["PYTHONPATH"] = str(ROOT)
    with subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=ROOT, stdin=slave,
                          stdout=slave, stderr=slave, env=env) as proc:
        os.close(slave)
        chunks = []
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.wait(CLI_TIMEOUT_S) == 0, b"".join(chunks)
    return ANSI.sub("", b"".join(chunks).decode())


def test_status_in_a_narrow_terminal_and_in_a_pipe_shows_whole_ids_and_circuits(
        two_agents: list[str]) -> None:
    # When status runs on a terminal 72 columns wide
    narrow = run_in_pty(["status"], 72)
    # Then each agent's id is whole on its row, with its circuit; columns were left out
    rows = [line for line in narrow.splitlines() if any(i in line for i in two_agents)]
    assert len(rows) == 2 and all("closed" in row for row in rows), narrow
    assert "left out to fit 72 columns" in narrow and "…" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 72
    # When its output is piped, even with COLUMNS saying 40
    piped = cli("status", env={**os.environ, "COLUMNS": "40"}, capture_output=True)
    # Then every column is there, at full width, ids whole
    assert piped.returncode == 0, piped.stderr
    header = next(line for line in piped.stdout.splitlines() if "circuit" in line)
    assert all(name in header for name, _ in AGENT_COLUMNS)
    assert all(any(i in line and "closed" in line for line in piped.stdout.splitlines())
               for i in two_agents)
    assert "…" not in piped.stdout and "left out" not in piped.stdout
