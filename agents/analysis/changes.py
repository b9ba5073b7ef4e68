"""Keep only the findings a change is responsible for.

A change review carries each file's changed line ranges (``changed_lines``: inclusive,
1-based ``[first, last]`` pairs, as :func:`workflows.files.collect_changes` reads them).
A finding is on the change when its lines meet a changed range: a finding on one line
when that line changed, a function-level finding (complexity, length: its ``line`` to
``end_line`` span the function) when any changed line falls inside the function.
Findings of the ``analysis`` category (the file could not be parsed, a limit was hit)
are about the whole file and always kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agents.findings import Category, Finding

LineRanges = tuple[tuple[int, int], ...]


def parse_ranges(raw: Any, path: str) -> LineRanges:
    """A file's ``changed_lines`` as ranges.

    Raises:
        TypeError: the field is not a list of ``[first, last]`` integer pairs.
    """
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise TypeError(f"changed_lines of {path} must be a list of [first, last] pairs")
    ranges = []
    for pair in raw:
        if not isinstance(pair, Sequence) or len(pair) != 2 or \
                not all(isinstance(n, int) for n in pair):
            raise TypeError(f"changed_lines of {path} must be a list of [first, last] "
                             f"pairs, not {pair!r}")
        ranges.append((min(pair), max(pair)))
    return tuple(sorted(ranges))


def touches(finding: Finding, ranges: LineRanges) -> bool:
    """Whether the finding's lines meet one of the changed ranges."""
    if finding.category is Category.ANALYSIS:
        return True
    first, last = finding.line, max(finding.end_line, finding.line)
    return any(start <= last and first <= end for start, end in ranges)


def on_changed_lines(findings: Iterable[Finding],
                     changed: Mapping[str, LineRanges]) -> list[Finding]:
    """The findings on changed lines; files without ranges in ``changed`` keep all theirs."""
    return [f for f in findings if f.path not in changed or touches(f, changed[f.path])]
