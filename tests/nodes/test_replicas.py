"""The replica bookkeeping on a fake clock and fake processes: back-off, crash loops,
targets, stopping (``nodes/replicas.py``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nodes.replicas import CrashBook, ReplicaPool, exit_text, replica_env

LOG = Path("/data/agents.log")


class FakeProcess:
    """A replica that runs until the test says it exited."""

    next_pid = 1000

    def __init__(self, spec: str) -> None:
        FakeProcess.next_pid += 1
        self.pid = FakeProcess.next_pid
        self.spec = spec
        self.code: int | None = None
        self.signals: list[int] = []
        self.lines: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def read_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines

    def close(self) -> None:
        pass


class Launcher:
    def __init__(self) -> None:
        self.started: list[FakeProcess] = []

    def __call__(self, spec: str) -> FakeProcess:
        process = FakeProcess(spec)
        self.started.append(process)
        return process


def book(limit: int = 5, window_s: float = 60.0) -> CrashBook:
    return CrashBook(limit, window_s, LOG, backoff_s=0.5, backoff_max_s=10.0)


# ------------------------------------------------------------------------- CrashBook


def test_back_off_doubles_per_crash_in_a_row_up_to_the_maximum() -> None:
    crashes = book(limit=100)
    delays = [crashes.crashed("a", float(t), 1, 0.1, 0) for t in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_restart_waits_for_its_back_off() -> None:
    crashes = book()
    # Given a crash at t=100 (first delay 0.5 s)
    crashes.crashed("a", 100.0, 1, 0.1, 0)
    # Then the name may not start before 100.5, and may after; other names are free
    assert not crashes.may_start("a", 100.4)
    assert crashes.may_start("a", 100.5)
    assert crashes.may_start("b", 100.0)


def test_a_registered_replica_resets_the_back_off() -> None:
    crashes = book(limit=100)
    crashes.crashed("a", 0.0, 1, 0.1, 0)
    crashes.crashed("a", 1.0, 1, 0.1, 0)
    crashes.healthy("a")
    assert crashes.crashed("a", 2.0, 1, 0.1, 0) == 0.5


def test_a_replica_that_ran_long_resets_the_back_off() -> None:
    crashes = book(limit=100)
    for t in range(3):
        crashes.crashed("a", float(t), 1, 0.1, 0)
    assert crashes.crashed("a", 50.0, 1, 30.0, 0) == 0.5


def test_the_limit_within_the_window_is_a_crash_loop() -> None:
    crashes = book(limit=5, window_s=60.0)
    # Given four crashes within the window
    for t in (0.0, 10.0, 20.0, 30.0):
        assert crashes.crashed("a", t, 1, 0.1, 3) is not None
    assert crashes.failing() == {}
    # When a fifth comes within 60 s of the first
    assert crashes.crashed("a", 40.0, 2, 0.1, 3) is None
    # Then the name fails, with why, and never starts again
    assert crashes.failing() == {"a": "crash loop: 5 crashes within 60 s (last exit code 2); "
                                      f"its log: {LOG}"}
    assert not crashes.may_start("a", 1e9)


def test_crashes_older_than_the_window_do_not_count() -> None:
    crashes = book(limit=3, window_s=10.0)
    for t in (0.0, 5.0, 11.0, 16.0, 22.0, 27.0):
        assert crashes.crashed("a", t, 1, 0.1, 0) is not None
    assert crashes.failing() == {}


def test_a_crash_loop_is_retried_only_past_its_epoch() -> None:
    crashes = book(limit=2)
    crashes.crashed("a", 0.0, -9, 0.1, 4)
    crashes.crashed("a", 1.0, -9, 0.1, 4)
    assert "last exit code -9 (SIGKILL)" in crashes.failing()["a"]
    # The same or an older epoch leaves it failing; a newer one clears it all
    assert not crashes.retry("a", 4)
    assert not crashes.retry("a", 3)
    assert crashes.retry("a", 5)
    assert crashes.failing() == {}
    assert crashes.may_start("a", 1.0)
    assert crashes.crashed("a", 2.0, 1, 0.1, 5) == 0.5
    assert not crashes.retry("b", 9)


def test_exit_text() -> None:
    assert exit_text(2) == "2"
    assert exit_text(-15) == "-15 (SIGTERM)"
    assert exit_text(-200) == "-200"


# ------------------------------------------------------------------------- ReplicaPool


SPECS = {"echo": "tests.sample_agents:EchoAgent", "bad": "tests.nodes.crashing_agents:X"}


@pytest.fixture
def launcher() -> Launcher:
    return Launcher()


def pool_of(launcher: Launcher, limit: int = 5) -> ReplicaPool:
    pool = ReplicaPool(launcher, SPECS.get, book(limit=limit))
    pool.drain_s = 2.0
    return pool


def test_a_plan_starts_replicas_of_catalogue_names_only(launcher: Launcher) -> None:
    pool = pool_of(launcher)
    refused = pool.apply_plan({"echo": 3, "my.mod:Cls": 2}, {"echo": 7})
    assert refused == ["my.mod:Cls"]
    assert pool.tick(0.0)
    assert [p.spec for p in launcher.started] == [SPECS["echo"]] * 3
    assert pool.running() == {"echo": 3}
    assert pool.epochs == {"echo": 7}
    # A pass with nothing to do changes nothing
    assert not pool.tick(0.1)


def test_a_smaller_target_stops_the_newest_then_kills_after_the_drain(
        launcher: Launcher) -> None:
    pool = pool_of(launcher)
    pool.apply_plan({"echo": 1}, {})
    pool.tick(0.0)
    pool.apply_plan({"echo": 3}, {})
    pool.tick(1.0)
    first, second, third = launcher.started
    # When the target drops to 1
    pool.apply_plan({"echo": 1}, {})
    assert pool.tick(2.0)
    # Then the two newest get SIGTERM and no longer count as running
    assert first.signals == [] and second.signals == third.signals == [signal.SIGTERM]
    assert pool.running() == {"echo": 1}
    # And one that has not exited by drain + 10 s is killed; an exit is no crash
    second.code = 0
    pool.tick(3.0)
    pool.tick(2.0 + 2.0 + 10.0)
    assert third.signals == [signal.SIGTERM, signal.SIGKILL]
    third.code = -9
    pool.tick(15.0)
    assert pool.running() == {"echo": 1} and len(pool.replicas) == 1
    assert pool.crashes.failing() == {} and len(launcher.started) == 3


def test_names_not_in_the_plan_keep_their_target(launcher: Launcher) -> None:
    pool = pool_of(launcher)
    pool.apply_plan({"echo": 2}, {})
    pool.tick(0.0)
    pool.apply_plan({"bad": 0}, {})
    pool.tick(1.0)
    assert pool.running() == {"echo": 2}


def test_a_crash_restarts_after_the_back_off(launcher: Launcher) -> None:
    pool = pool_of(launcher)
    pool.apply_plan({"echo": 2}, {})
    pool.tick(0.0)
    launcher.started[0].lines.append('{"event": "registered", "agent_id": "echo-1"}')
    pool.tick(0.5)
    assert pool.replicas[0].agent_id == "echo-1"
    # When a replica exits unasked
    launcher.started[0].code = 1
    assert pool.tick(10.0)
    # Then it is not replaced before its back-off (0.5 s), and is after
    assert pool.running() == {"echo": 1}
    assert not pool.tick(10.4)
    assert pool.tick(10.5)
    assert pool.running() == {"echo": 2} and len(launcher.started) == 3


def test_a_crash_loop_stops_restarts_until_the_epoch_moves(launcher: Launcher) -> None:
    pool = pool_of(launcher, limit=3)
    pool.apply_plan({"bad": 1}, {"bad": 1})
    now = 0.0
    pool.tick(now)
    # Given every start crashing at once
    for _ in range(3):
        launcher.started[-1].code = 2
        now += 20.0  # past any back-off
        pool.tick(now)
        pool.tick(now + 1.0)  # past its back-off: started again
    assert "bad" in pool.crashes.failing() and len(launcher.started) == 3
    # Then no more starts, whatever the time or a plan of the same epoch
    pool.apply_plan({"bad": 1}, {"bad": 1})
    pool.tick(now + 100.0)
    assert len(launcher.started) == 3 and pool.running() == {}
    # When the epoch moves, it starts again
    pool.apply_plan({"bad": 1}, {"bad": 2})
    pool.tick(now + 101.0)
    assert len(launcher.started) == 4 and pool.crashes.failing() == {}
    assert pool.epochs == {"bad": 2}


def test_stop_all_stops_everything_and_starts_nothing(launcher: Launcher) -> None:
    pool = pool_of(launcher)
    pool.apply_plan({"echo": 2}, {})
    pool.tick(0.0)
    pool.stop_all(1.0)
    assert all(p.signals == [signal.SIGTERM] for p in launcher.started)
    assert pool.running() == {}
    for process in launcher.started:
        process.code = 0
    pool.tick(1.5)
    assert pool.empty() and len(launcher.started) == 2


def test_a_name_leaving_the_catalogue_is_stopped(launcher: Launcher) -> None:
    pool = pool_of(launcher)
    pool.apply_plan({"echo": 1}, {"echo": 3})
    pool.tick(0.0)
    pool.forget("echo")
    pool.tick(1.0)
    assert launcher.started[0].signals == [signal.SIGTERM] and pool.epochs == {}


def test_replicas_get_the_agent_key_and_the_data_dir() -> None:
    env = replica_env({"ORCH_CURVE_KEY_FILE": "/k/node.key_secret",
                       "ORCH_AGENT_CURVE_KEY_FILE": "/k/agent.key_secret", "X": "1"},
                      Path("/data"))
    assert env["ORCH_CURVE_KEY_FILE"] == "/k/agent.key_secret"
    assert env["ORCH_HOME"] == "/data" and env["X"] == "1"
    plain = replica_env({"ORCH_CURVE_KEY_FILE": "/k/node.key_secret"}, Path("/data"))
    assert plain["ORCH_CURVE_KEY_FILE"] == "/k/node.key_secret"
