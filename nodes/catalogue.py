"""What a node may run: its catalogue of agent names.

The broker names agents, never code: a PLAN says "run 3 of ``reviewer``", and the node
looks ``reviewer`` up here. A node therefore never runs a ``module:Class`` it was not
given by its own operator (``--catalogue``, ``HOME/node.json``), whatever a broker (or
whoever holds a node key) asks for.

Entries:

- the built-in agents by name (``cli.pool.BUILT_INS``: ``reviewer``, ``researcher``,
  ``coder``, ``synthesizer``);
- ``module:Class`` entries from ``--catalogue``, named by the spec string itself;
- ``module:Class`` entries from ``HOME/node.json`` (``{"catalogue": ["module:Class"]}``),
  re-read when its mtime changes, so that ``orchestrator agents start my.mod:Cls`` can add
  one while the supervisor runs. The supervisor never writes that file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

from cli.pool import BUILT_INS
from wire.nodes import MAX_CATALOGUE, MAX_NAME_CHARS

logger = logging.getLogger(__name__)

#: The catalogue file in the data dir.
CATALOGUE_FILE: Final = "node.json"


class CatalogueError(ValueError):
    """Raised when a ``--catalogue`` entry is not ``module:Class``; the message says which."""


def check_spec(spec: str) -> str:
    """``spec`` if it reads as ``module:Class`` (printable, at most the wire's name length).

    Raises:
        CatalogueError: it does not.
    """
    module, sep, cls = spec.partition(":")
    if (not sep or not module or not cls or not spec.isprintable() or " " in spec
            or len(spec) > MAX_NAME_CHARS):
        raise CatalogueError(f"{spec[:80]!r} is not module:Class")
    return spec


class Catalogue:
    """The agent names this node may run, and the ``module:Class`` each one runs.

    Args:
        home: The data dir, where ``node.json`` lives.
        extra: ``module:Class`` entries from the command line (checked by the caller with
            :func:`check_spec`).
    """

    def __init__(self, home: Path, extra: list[str] | tuple[str, ...] = ()) -> None:
        self.path = home / CATALOGUE_FILE
        self._fixed: dict[str, str] = {name: b.spec for name, b in BUILT_INS.items()}
        for spec in extra:
            self._fixed.setdefault(spec, spec)
        self._from_file: dict[str, str] = {}
        #: the file's (mtime_ns, size) last read; None: not there
        self._seen: tuple[int, int] | None = None
        self.refresh()

    def names(self) -> tuple[str, ...]:
        """Every name, in order: built-ins, command line, file (at most the wire allows)."""
        merged = {**self._fixed, **{k: v for k, v in self._from_file.items()
                                    if k not in self._fixed}}
        return tuple(merged)[:MAX_CATALOGUE]

    def spec(self, name: str) -> str | None:
        """The ``module:Class`` of ``name``; None when the node may not run it."""
        if name not in self.names():
            return None
        return self._fixed.get(name) or self._from_file.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.spec(name) is not None

    def refresh(self) -> bool:
        """Re-read ``node.json`` if it changed since the last look.

        A file that cannot be read or parsed keeps the entries read before (a torn write
        of another process must not stop the replicas it named); a file that is gone
        removes its entries.

        Returns:
            Whether the names changed.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            logger.warning("cannot look at the catalogue file %s: %s", self.path, e)
            return False
        else:
            stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        self._seen = stamp
        before = self.names()
        if stamp is None:
            self._from_file = {}
        else:
            entries = self._read()
            if entries is None:
                return False
            self._from_file = {spec: spec for spec in entries}
        changed = self.names() != before
        if changed:
            logger.info("catalogue now: %s", ", ".join(self.names()))
        return changed

    def _read(self) -> list[str] | None:
        """The file's valid entries; None when it cannot be read as a catalogue."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            logger.warning("cannot read the catalogue file %s (keeping its entries read "
                           "before): %s", self.path, e)
            return None
        entries = data.get("catalogue") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            logger.warning('the catalogue file %s has no "catalogue" list; ignored', self.path)
            return None
        valid = []
        for entry in entries:
            try:
                valid.append(check_spec(entry if isinstance(entry, str) else repr(entry)))
            except CatalogueError as e:
                logger.warning("catalogue file %s: %s; entry ignored", self.path, e)
        return valid


__all__ = ["CATALOGUE_FILE", "Catalogue", "CatalogueError", "check_spec"]
