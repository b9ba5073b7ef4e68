"""Benchmark: one analysis worker against ``bandit -r`` on the Python standard library.

Skipped unless ``ORCH_BENCH=1`` (it takes minutes). ``ORCH_BENCH_PATH`` picks another
tree; ``ORCH_BENCH_EVERY=n`` takes every n-th file (a quicker sample). It prints both wall
times and checks that the (file, line, test id) sets are equal.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from agents.analysis.pool import WorkerPool

pytestmark = pytest.mark.skipif(os.environ.get("ORCH_BENCH") != "1",
                                reason="a benchmark of minutes: set ORCH_BENCH=1")

BANDIT = str(Path(sys.executable).with_name("bandit"))


def _files(root: Path, every: int) -> list[str]:
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and p.is_file())
    return found[::every]


@pytest.mark.timeout(1800)
def test_one_worker_against_bandit(tmp_path: Path) -> None:
    # Given the standard library's Python files (site-packages left out)
    root = Path(os.environ.get("ORCH_BENCH_PATH") or sysconfig.get_paths()["stdlib"])
    files = _files(root, int(os.environ.get("ORCH_BENCH_EVERY", "1")))
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(root / f) for f in files))
    # When bandit runs over them on its own
    report = tmp_path / "bandit.json"
    started = time.perf_counter()
    subprocess.run([BANDIT, "-q", "-f", "json", "-o", str(report),
                    *(str(root / f) for f in files)], check=False)
    bandit_s = time.perf_counter() - started

    # and one worker of ours audits the same files
    async def ours() -> tuple[float, set[tuple[str, int, str]]]:
        pool = WorkerPool(1, memory_mb=2048, file_timeout_s=300)
        await pool.start()
        try:
            began = time.perf_counter()
            outcomes = await pool.analyze(root, files, ["security"])
            took = time.perf_counter() - began
        finally:
            await pool.close()
        return took, {(o.path, int(f["line"]), str(f["rule"])) for o in outcomes
                      for f in o.findings if f["tool"] == "bandit"}

    ours_s, found = asyncio.run(ours())
    theirs = {(Path(r["filename"]).relative_to(root).as_posix(), r["line_number"],
               r["test_id"]) for r in json.loads(report.read_text())["results"]}
    print(f"\n{len(files)} files: bandit -r {bandit_s:.1f} s, one worker {ours_s:.1f} s "
          f"(ratio {ours_s / bandit_s:.2f}); {len(found)} findings vs {len(theirs)}")
    # Then the findings are bandit's, file, line and test id
    assert found == theirs
