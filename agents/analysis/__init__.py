"""The reviewer's analyses: security (bandit plus our own checks), code review, performance.

The checks run in long-lived worker processes (:mod:`agents.analysis.worker`) that the
reviewer agent drives through a pool (:mod:`agents.analysis.pool`), never in the agent's
own process: a file that makes a tool spin or eat memory kills a worker, not the agent.

- :mod:`agents.analysis.source`: one parsed file and name resolution shared by the checks;
- :mod:`agents.analysis.security`: bandit as a library, and ``S1xx`` checks for the forms
  bandit misses (calls through a variable, ``getattr(module, "name")``);
- :mod:`agents.analysis.quality`: code review (``R1xx``);
- :mod:`agents.analysis.performance`: performance (``P1xx``);
- :mod:`agents.analysis.changes`: keep only findings on a change's lines;
- :mod:`agents.analysis.protocol`: the frames between agent and worker (msgpack).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Analysis(StrEnum):
    """One analysis a reviewer task asks for, named as in its result's ``analyses``."""

    SECURITY = "security"
    REVIEW = "review"
    PERFORMANCE = "performance"


class FileStatus(StrEnum):
    """How the analysis of one file ended."""

    ANALYZED = "analyzed"
    UNPARSEABLE = "unparseable"
    TIME_LIMIT = "time_limit"
    MEMORY_LIMIT = "memory_limit"


#: Capability -> the analysis it asks for.
CAPABILITY_ANALYSES: Final = {
    "security_audit": Analysis.SECURITY,
    "code_review": Analysis.REVIEW,
    "performance_analysis": Analysis.PERFORMANCE,
}

__all__ = ["CAPABILITY_ANALYSES", "Analysis", "FileStatus"]
