"""Where the data dir is: one rule for the broker, the CLI and the agents.

The broker keeps its lock, journal and state there; the CLI finds the running broker
there; an agent that keeps data of its own (the researcher's index) puts it below it.
It lives in ``wire`` because every side needs it and ``wire`` is what they all share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: A data dir of the current directory's, used when it exists and ORCH_HOME is not set.
DEFAULT_HOME: Final = ".orchestrator"
#: The per-user data dir, under ``$XDG_STATE_HOME`` (default ``~/.local/state``): where
#: the data dir is when neither ORCH_HOME nor ``./.orchestrator`` says otherwise.
USER_HOME_NAME: Final = "orchestrator"


#: Data dirs besides :func:`home_dir` whose secure broker this process may reach with the
#: local admin key (``wire/curve.py``): the CLI's ``--home``.
local_homes: list[Path] = []


def add_local_home(home: Path) -> None:
    """Let this process use the local admin key of the data dir ``home`` for the
    endpoints its secure broker announced (the CLI calls it for its data dir)."""
    if home not in local_homes:
        local_homes.append(home)


def home_dir() -> Path:
    """The data dir (pid file, lock, logs, journal, state): see :func:`locate_home`."""
    return locate_home()[0]


def locate_home() -> tuple[Path, str]:
    """The data dir and where that choice comes from, first match wins:

    1. ``$ORCH_HOME``;
    2. ``./.orchestrator``, where it exists in the current directory;
    3. the per-user directory ``$XDG_STATE_HOME/orchestrator`` (``XDG_STATE_HOME``
       defaults to ``~/.local/state``, and a relative one is ignored, as the XDG spec
       says), so that any directory finds the user's running broker.

    Returns:
        The absolute path (it may not exist yet) and a few words saying why it is the one.
    """
    explicit = os.environ.get("ORCH_HOME")
    if explicit:
        return Path(explicit).absolute(), "from ORCH_HOME"
    local = Path(DEFAULT_HOME)
    if local.is_dir():
        return local.absolute(), f"./{DEFAULT_HOME} exists in the current directory"
    return user_home_dir(), "the per-user default"


def user_home_dir() -> Path:
    """``$XDG_STATE_HOME/orchestrator``, else ``~/.local/state/orchestrator``."""
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else \
        Path.home() / ".local" / "state"
    return base / USER_HOME_NAME


__all__ = ["DEFAULT_HOME", "add_local_home", "local_homes", "USER_HOME_NAME", "home_dir", "locate_home", "user_home_dir"]
