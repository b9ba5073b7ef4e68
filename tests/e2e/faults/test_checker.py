"""The checker itself, on made-up histories (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.faults.checker import check


def write_log(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def test_clean_history_is_valid(tmp_path: Path) -> None:
    # Given 3 tasks, each answered once and run once
    log = write_log(tmp_path / "a.log", ["t1", "t2", "t3"])
    # When checked
    report = check(["t1", "t2", "t3"], [("t1", "succeeded"), ("t2", "succeeded"),
                                        ("t3", "failed")], [log])
    # Then nothing is wrong
    assert report.counts()["lost"] == report.counts()["duplicated"] == 0
    assert report.valid and not report.re_executed and not report.phantom
    assert report.statuses == {"succeeded": 2, "failed": 1}
    report.assert_valid("clean")


def test_counts_lost_duplicated_unexpected_re_executed_phantom(tmp_path: Path) -> None:
    # Given a history with every kind of anomaly
    a = write_log(tmp_path / "a.log", ["t1", "t2", "zz"])
    b = write_log(tmp_path / "b.log", ["t2", "t2"])
    results = [("t1", "succeeded"), ("t1", "succeeded"), ("t2", "succeeded"),
               ("x9", "succeeded"), ("t4", "succeeded")]
    # When checked
    report = check(["t1", "t2", "t3", "t4"], results, [a, b],
                   deliveries=[("t1", "succeeded"), ("t2", "succeeded"), ("t2", "succeeded")])
    # Then each anomaly is counted where it belongs
    assert report.lost == {"t3"}
    assert report.duplicated == {"t1"}
    assert report.unexpected == {"x9", "zz"}
    assert report.re_executed == {"t2"} and report.max_executions == 3
    assert report.phantom == {"t4", "x9"}
    assert report.redelivered == {"t2"}
    assert report.executions == 5
    with pytest.raises(AssertionError, match="lost"):
        report.assert_valid("broken")


def test_result_for_the_wrong_handle_is_unexpected() -> None:
    # Given a result whose id differs from the handle it was awaited on
    report = check(["t1", "t2"], [("t1", "succeeded"), ("t1", "succeeded")],
                   handle_ids=["t1", "t2"])
    # Then it is both a duplicate and unexpected, and t2 is lost
    assert report.lost == {"t2"} and report.duplicated == {"t1"} and "t1" in report.unexpected


def test_phantoms_may_be_allowed_when_not_every_agent_logs() -> None:
    report = check(["t1"], [("t1", "succeeded")])
    assert report.phantom == {"t1"}
    report.assert_valid("no logs", phantoms_allowed=True)
    with pytest.raises(AssertionError, match="phantom"):
        report.assert_valid("no logs")
