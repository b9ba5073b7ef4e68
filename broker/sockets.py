"""The socket helpers' old home: they live in :mod:`wire.sockets` now (kept for one release)."""

from __future__ import annotations

from wire.sockets import (  # noqa: F401 - re-exported
    NOBLOCK, apply_common_options, has_input, recv_frames, send_frames,
)
