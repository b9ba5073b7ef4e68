"""The ``hosts`` fixture: a broker host, two nodes and a client host (tests/multihost/netns.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Hosts, hosts_for


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """Namespaces ``broker``, ``node1``, ``node2`` and ``client``, deleted at teardown.
    Skips when not root; fails when root and they cannot be created."""
    with hosts_for(tmp_path, ("node1", "node2", "client")) as made:
        yield made
