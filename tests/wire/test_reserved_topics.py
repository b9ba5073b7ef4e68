"""Which socket a subscription listens on (``wire.bus.topic_routes``): broker topics come
from the broker's events socket only, everything else from the shared forwarder."""

from __future__ import annotations

import pytest

from wire.bus import RESERVED_PREFIX_BYTES, RESERVED_PREFIXES, is_reserved, topic_routes


@pytest.mark.parametrize(("prefix", "routes"), [
    ("", (True, True)),                 # everything: both sockets
    ("t", (True, True)),                # "tasks." starts with it, so does "t-shirts"
    ("agents", (True, True)),           # "agents.joined" and "agents-x"
    ("tasks.", (False, True)),          # broker topics only
    ("tasks.t-1", (False, True)),
    ("agents.health", (False, True)),
    ("news.", (True, False)),           # never a broker topic
    ("tasksx", (True, False)),
    ("workflow.", (True, False)),
])
def test_a_prefix_listens_where_its_topics_can_come_from(prefix: str,
                                                         routes: tuple[bool, bool]) -> None:
    assert topic_routes(prefix) == routes


def test_reserved_topics_are_the_brokers_prefixes() -> None:
    assert RESERVED_PREFIXES == ("agents.", "tasks.")
    assert RESERVED_PREFIX_BYTES == (b"agents.", b"tasks.")
    assert is_reserved("tasks.t-1") and is_reserved("agents.joined")
    assert not is_reserved("tasks") and not is_reserved("news.agents.joined")
