"""The names an agent registers under: what the broker accepts, checked before READY.

The broker refuses a READY whose agent id, name or a capability is empty, longer than
:data:`MAX_NAME_CHARS` or not printable (a newline in a name would forge lines in its
log), with ERROR ``bad_request``. The SDK checks the same rules when an agent is built
and again before it connects, so that the mistake shows where it was made.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Final

from agent_sdk.errors import InvalidName
from wire.limits import MAX_NAME_CHARS

#: Longest agent id, name or capability the broker accepts.
#: Characters of a generated agent id after the name: ``-`` and 10 hex digits.
_ID_SUFFIX_CHARS: Final = 11


def check_name(what: str, value: object) -> None:
    """Check one agent id, name or capability.

    Args:
        what: what it is, for the message (``"name"``, ``"capability"``...).
        value: the value to check.

    Raises:
        InvalidName: it is not a string of 1 to :data:`MAX_NAME_CHARS` printable
            characters.
    """
    if not isinstance(value, str):
        raise InvalidName(f"the agent's {what} must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_NAME_CHARS:
        raise InvalidName(f"the agent's {what} {value[:40]!r}{'...' if len(value) > 40 else ''}"
                          f" has {len(value)} characters; it must have 1 to "
                          f"{MAX_NAME_CHARS}")
    if not value.isprintable():
        raise InvalidName(f"the agent's {what} {value[:40]!r} contains control characters "
                          "(newlines, tabs, escapes...); use printable text")


def check_names(name: str, agent_id: str, capabilities: Iterable[str]) -> None:
    """Check everything an agent registers under (see :func:`check_name`).

    Raises:
        InvalidName: for the first value the broker would refuse.
    """
    check_name("name", name)
    check_name("id", agent_id)
    for capability in capabilities:
        check_name("capability", capability)


def new_agent_id(name: str) -> str:
    """A unique agent id for an instance of ``name``: ``name-<10 hex digits>``, the name
    cut so that the id stays within :data:`MAX_NAME_CHARS`."""
    return f"{name[:MAX_NAME_CHARS - _ID_SUFFIX_CHARS]}-{uuid.uuid4().hex[:10]}"


__all__ = ["MAX_NAME_CHARS", "check_name", "check_names", "new_agent_id"]
