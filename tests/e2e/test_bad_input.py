"""Bad input on the command line: one line on stderr and exit 2, never a traceback.

The property test walks the ``orchestrator`` group (``cli.main.main``) and its commands,
takes every option and argument that takes a value from click's own parameter lists,
and gives each one hostile values. Every command runs in-process (click's CliRunner)
against a broker address where nothing listens and a temporary data dir; what would
start processes (``start``'s launch, ``state serve``, the benchmarks) is replaced by a
stub, so that a valid value reaches the command's body and ends there.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli.bench
import cli.common
import cli.lifecycle
import cli.oneshot
import cli.state
from cli.main import main

#: Values of required arguments when another parameter is the one under test.
REQUIRED = {"text": "hello", "task_id": "t-1", "key": "k", "value": "1", "name": "reviewer",
            "replicas": "1",
            "public_key_or_file": "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"}
#: ... where a command needs another: `run` plans its text before anything else.
REQUIRED_BY_COMMAND = {("run",): {"text": "Research vector databases"}}
#: Parameters whose value the command checks itself, after click's type took it.
CHECKED_IN_BODY = {"payload"}
#: ... on one command: `run` plans its text first, and a text it cannot plan is a usage
#: error (exit 2) naming what the agents can do.
CHECKED_IN_BODY_OF = {(("run",), "text")}
#: Values that break some type: empty, blank, non-finite, negative, beyond 64 bits,
#: control characters, undecodable bytes (as Python sees them in argv), very long.
HOSTILE = ["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1", "0", "-0", "0.0001", "1.5",
           "1e9", "1e10", str(2 ** 63), str(2 ** 64), str(-(2 ** 63) - 1), "9" * 5000, "0x10",
           "abc", "\n", "a\nb", "\t", "\x1b[31mred", "\udcff", "x" * 2000, "--json", "-",
           "tcp://", "tcp://:1", "tcp://host:0", "tcp://host:65536", "host:5555",
           "tcp://127.0.0.1:5555", "*:0", "[::1]:1", "none,batch", "none,,x", "m:C=0",
           "m:C=99999999999999999999", "tests.sample_agents:EchoAgent=2", "ü", "1", "42"]


Located = tuple[click.Parameter, tuple[str, ...]]


def value_params(command: click.Command, path: tuple[str, ...] = (),
                 parents: tuple[Located, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], click.Command, Located]]:
    """(command path, command, parameter) for every parameter that takes a value, the
    groups' own included (given to the first command under them)."""
    own = [p for p in command.params if not getattr(p, "is_flag", False)
           and not (isinstance(p, click.Option) and p.count)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)  # (the top-level group imports its commands on use)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from value_params(sub, (*path, name), (*parents, *((p, path) for p in own)))
        return
    for param, at in parents:
        yield (*path,), command, (param, at)
    for param in own:
        yield (*path,), command, (param, path)


PARAMS = list(value_params(main))


def test_the_walk_finds_every_command_and_the_options_of_the_issue() -> None:
    seen = {(" ".join(at), p.name) for _, _, (p, at) in PARAMS}
    commands = {" ".join(path) for path, _, _ in PARAMS}
    assert {"submit", "result", "start", "state get", "state serve", "bench throughput"} \
        <= commands
    assert {("", "broker_url"), ("", "home"), ("submit", "timeout"), ("submit", "retries"),
            ("submit", "priority"), ("state get", "key"), ("state", "state_url")} <= seen


def command_line(path: tuple[str, ...], command: click.Command, param: click.Parameter,
                 at: tuple[str, ...], value: str, as_json: bool) -> list[str]:
    """The arguments that give ``value`` to ``param`` (of the command or group at ``at``)
    and valid values to the command's other required arguments."""
    args: list[str] = []
    for depth in range(len(path) + 1):
        if depth:
            args.append(path[depth - 1])
        if at == path[:depth] and isinstance(param, click.Option):
            args.append(f"{max(param.opts, key=len)}={value}")
    if as_json:
        args.append("--json")
    required = {**REQUIRED, **REQUIRED_BY_COMMAND.get(path, {})}
    # Required options (`agents scale --replicas`) get a valid value too.
    args += [f"{max(p.opts, key=len)}={required[p.name or '']}" for p in command.params
             if isinstance(p, click.Option) and p.required and p is not param]
    positional = [value if p is param else required[p.name or ""]
                  for p in command.params if isinstance(p, click.Argument)
                  and (p is param or p.required)]
    return [*args, "--", *positional]


def valid(param: click.Parameter, value: str) -> bool:
    """Whether click's type of ``param`` takes ``value`` (the usage error is the CLI's
    answer otherwise)."""
    try:
        param.type.convert(value, param, None)
    except click.BadParameter:
        return False
    return True


def stub_output(as_json: bool) -> None:
    """What a stubbed launch or benchmark prints: one JSON document with --json."""
    if as_json:
        cli.common.emit_json({"stub": True})


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CliRunner in a temporary directory, against a port where nothing listens, with
    what would start processes replaced by stubs that succeed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ORCH_BROKER", f"tcp://127.0.0.1:{port}")
    monkeypatch.delenv("ORCH_STATE", raising=False)
    monkeypatch.delenv("ORCH_LOG_LEVEL", raising=False)
    # Unreachable in a fraction of a second instead of 3 s.
    monkeypatch.setattr(cli.common, "PING_TIMEOUT_S", 0.2)
    monkeypatch.setattr(cli.state, "PING_TIMEOUT_S", 0.2)
    monkeypatch.setattr(cli.lifecycle, "_launch", lambda *args: stub_output(args[-1]))
    monkeypatch.setattr(cli.bench, "_run", lambda *args: stub_output(args[2]))
    monkeypatch.setattr(cli.oneshot, "_run_private", lambda *args: stub_output(args[7]))
    monkeypatch.setattr("broker.state.__main__.serve", lambda *args, **kwargs: 0)
    return CliRunner()


def check_output(outcome: Result, args: list[str], as_json: bool) -> None:
    """No traceback, at most one line on stderr, one JSON document with --json."""
    where = f"orchestrator {args!r}"
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), (
        where, outcome.exc_info)
    assert "Traceback" not in outcome.output, where
    assert len(outcome.stderr.splitlines()) <= 1, (where, outcome.stderr)
    if outcome.exit_code:
        assert outcome.stderr.startswith("error: "), (where, outcome.stderr)
    if as_json:
        document = orjson.loads(outcome.stdout)
        if outcome.exit_code:
            assert document["exit_code"] == outcome.exit_code, where


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(choice=st.sampled_from(PARAMS),
       value=st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12),
                       st.integers().map(str), st.floats().map(repr)),
       as_json=st.booleans())
def test_hostile_values_for_every_option_of_every_command(
        runner: CliRunner, choice: Any, value: str, as_json: bool) -> None:
    path, command, (param, at) = choice
    as_json = as_json and any(p.name == "as_json" for p in command.params)
    args = command_line(path, command, param, at, value, as_json)
    outcome = runner.invoke(main, args)
    check_output(outcome, args, as_json)
    if not valid(param, value):
        assert outcome.exit_code == 2, (args, outcome.stderr)
    else:
        # Valid: the command ran, and found no broker (3), or succeeded (0: a stub),
        # or failed for a reason of its own (1).
        # `submit --payload` is JSON, read by the command itself: a usage error too.
        checked = param.name in CHECKED_IN_BODY or (path, param.name) in CHECKED_IN_BODY_OF
        allowed = (0, 1, 2, 3) if checked else (0, 1, 3)
        assert outcome.exit_code in allowed, (args, outcome.exit_code, outcome.stderr)


#: The cases of issue 11, each a usage error whatever the broker.
ISSUE_CASES = [
    ["--broker", "nonsense", "status"],
    ["--broker", "tcp://host:99999", "status"],
    ["submit", "x", "--timeout", "nan"],
    ["submit", "x", "--timeout", "-1"],
    ["submit", "x", "--timeout", "inf"],
    ["submit", "x", "--timeout", "0"],
    ["submit", "x", "--retries", str(2 ** 64)],
    ["submit", "x", "--retries", "-1"],
    ["submit", "x", "--priority", str(2 ** 64)],
    ["submit", "x", "--priority", str(-(2 ** 64))],
    ["submit", "x", "--agent", "a\nb"],
    ["submit", "x", "--capability", ""],
    ["result", "t-1", "--wait", "--timeout", "-inf"],
    ["result", ""],
    ["tasks", "--limit", str(2 ** 64)],
    ["state", "get", ""],
    ["state", "del", ""],
    ["state", "set", "", "1"],
    ["state", "set", "k", "1", "--ttl", "nan"],
    ["state", "--state", "nonsense", "get", "k"],
    ["state", "serve", "--bind", "nonsense"],
    ["state", "serve", "--heartbeat-interval", "inf"],
    ["start", "--bind", "nonsense"],
    ["start", "--agents", "m:C=99999999999999999999"],
    ["bench", "throughput", "--tasks", str(2 ** 64)],
    ["bench", "throughput", "--durability", "sometimes"],
    ["status", "--no-such-option"],
    ["no-such-command"],
]


@pytest.mark.parametrize("args", ISSUE_CASES, ids=" ".join)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_the_cases_of_the_issue_are_usage_errors(runner: CliRunner, args: list[str],
                                                 as_json: bool) -> None:
    args = [*args, "--json"] if as_json else args
    outcome = runner.invoke(main, args)
    check_output(outcome, args, as_json)
    assert outcome.exit_code == 2, (args, outcome.stderr)
    assert outcome.stdout == "" if not as_json else orjson.loads(outcome.stdout)["exit_code"] == 2


def test_a_bad_orch_broker_is_a_usage_error(runner: CliRunner,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_BROKER", "nonsense")
    outcome = runner.invoke(main, ["status", "--json"])
    check_output(outcome, ["status", "--json"], True)
    assert outcome.exit_code == 2 and "ORCH_BROKER" in outcome.stderr


def test_a_valid_value_reaches_the_broker(runner: CliRunner) -> None:
    outcome = runner.invoke(main, ["submit", "x", "--timeout", "2.5", "--retries", "3",
                                "--priority", str(2 ** 63 - 1), "--json"])
    check_output(outcome, [], True)
    assert outcome.exit_code == 3


def test_a_group_run_bare_prints_its_help(runner: CliRunner) -> None:
    for args in ([], ["state"]):
        outcome = runner.invoke(main, args)
        assert outcome.exit_code == 2 and "Usage:" in outcome.output, args
