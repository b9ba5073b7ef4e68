"""Fixtures of the fault tests (the ``cluster`` fixture comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Cluster
from tests.e2e.faults.support import Signals


@pytest.fixture
def signals(cluster: Cluster) -> Iterator[Signals]:
    """SIGSTOP/SIGCONT for processes; every process still stopped at the end of the test
    gets SIGCONT before the cluster kills it (torn down before ``cluster``)."""
    sig = Signals()
    try:
        yield sig
    finally:
        sig.close()
