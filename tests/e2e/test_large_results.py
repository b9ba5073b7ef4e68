"""Large results end to end (the smoke run of bench/large_results.py): results kept out of
the broker's memory and journal, fetched by id intact, also after a broker SIGKILL and
restart (the result store in the data dir)."""

from __future__ import annotations

from bench.large_results import run


def test_large_results_are_fetched_intact_across_a_restart() -> None:
    report = run(tasks=4, size=8_000_000)
    assert report["intact_before_restart"] and report["intact_after_restart"]
    assert report["reregistrations"] == 0
    # 32 MB of results in all: far less than that stays in the broker
    assert report["rss_growth_mb"] < 200
