"""Loading a package's mypyc build only while it matches the source exactly.

``wire`` and ``broker`` each have a compiled build of their hot modules in
``<package>/_native/`` (written by ``python -m broker.native build``), one mypyc group
each, so that an agent process, which imports ``wire`` but never ``broker``, loads no
broker code, compiled or not. A package loads its build only while the manifest's source
hashes match the source (and the interpreter is the one it was built for); otherwise it
warns and runs the Python source, so an edit is never shadowed by a stale build.

This module is plain Python on purpose: it runs before any compiled module can load.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

#: Set to run the Python source even when a fresh build exists.
PURE_PYTHON_ENV = "ORCH_PURE_PYTHON"
#: The file in a build directory that lists the source hashes it was built from.
NATIVE_MANIFEST = "manifest.json"


def module_source(name: str, project_dir: Path) -> Path:
    """The source file of dotted module ``name`` under ``project_dir``."""
    return project_dir.joinpath(*name.split(".")).with_suffix(".py")


@dataclass(frozen=True)
class NativeBuild:
    """One package's compiled build: which modules, in which mypyc group, built against
    which other builds (whose source must match too, since compiled code calls into them
    directly).

    Attributes:
        package: the top-level package, e.g. ``"wire"``.
        modules: the dotted names of the modules mypyc compiles.
        group: the mypyc group name (its shared library is ``<group>__mypyc``).
        requires: builds this one's compiled code calls into.
    """

    package: str
    modules: tuple[str, ...]
    group: str
    requires: tuple[NativeBuild, ...] = ()

    @property
    def package_dir(self) -> Path:
        return Path(__file__).resolve().parent.parent / self.package

    @property
    def project_dir(self) -> Path:
        return self.package_dir.parent

    @property
    def native_dir(self) -> Path:
        return self.package_dir / "_native"

    def all_modules(self) -> tuple[str, ...]:
        """This build's modules and those of every build it requires, each once."""
        names: list[str] = []
        for build in self.requires:
            names.extend(m for m in build.all_modules() if m not in names)
        names.extend(m for m in self.modules if m not in names)
        return tuple(names)

    def source_digests(self, project_dir: Path | None = None) -> dict[str, str]:
        """SHA-256 of the source of :meth:`all_modules`, by module name."""
        root = project_dir or self.project_dir
        return {name: hashlib.sha256(module_source(name, root).read_bytes()).hexdigest()
                for name in self.all_modules()}

    def check(self, native_dir: Path | None = None,
              project_dir: Path | None = None) -> tuple[bool, str]:
        """Whether the build in ``native_dir`` may be loaded, and why (not)."""
        if os.environ.get(PURE_PYTHON_ENV):
            return False, f"{PURE_PYTHON_ENV} is set"
        directory = native_dir or self.native_dir
        try:
            manifest = json.loads((directory / NATIVE_MANIFEST).read_text())
        except FileNotFoundError:
            return False, "not built"
        except (OSError, ValueError) as e:
            return False, f"unreadable manifest: {e}"
        if manifest.get("python") != sys.implementation.cache_tag:
            return False, (f"built for {manifest.get('python')}, "
                           f"running {sys.implementation.cache_tag}")
        if manifest.get("modules") != self.source_digests(project_dir):
            return False, "the source changed since the build"
        return True, "fresh"

    def load(self, package_path: list[str], required_loaded: bool = True) -> bool:
        """Put the build in front of the package's source when :meth:`check` allows it.

        Args:
            package_path: the package's ``__path__``, which the build's directory joins.
            required_loaded: whether every required build is loaded in this process;
                compiled code of this build must not meet the Python classes of another.

        Returns:
            Whether this process runs the compiled modules.
        """
        usable, why = self.check()
        if usable and not required_loaded:
            usable, why = False, "a build it depends on is not loaded"
        if not usable:
            if (self.native_dir / NATIVE_MANIFEST).exists() and not os.environ.get(PURE_PYTHON_ENV):
                warnings.warn(f"{self.package}: not loading the compiled hot paths ({why}); "
                              "running the Python source. Rebuild: python -m broker.native build",
                              RuntimeWarning, stacklevel=3)
            return False
        # The extensions of <package>/_native/<package> shadow the sources; the group's
        # shared runtime library sits in <package>/_native itself and is imported by name.
        sys.path.append(str(self.native_dir))
        package_path.insert(0, str(self.native_dir / self.package))
        return True
