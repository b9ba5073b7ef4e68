"""The Orchestrator broker: routes tasks from clients to agents over one ROUTER socket.

On import, the package looks for a compiled build of its hot modules (``python -m
broker.native build``, run by ``./setup.sh``) and uses it only while it matches the
source exactly; see :mod:`broker.native`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

__version__ = "0.1.0"

#: The modules mypyc compiles: the broker's per-message code (agents and clients use the
#: compiled protocol and socket helpers too).
COMPILED_MODULES: tuple[str, ...] = (
    "broker.sockets", "broker.tasks", "broker.routing", "broker.protocol", "broker.server",
)
PACKAGE_DIR = Path(__file__).resolve().parent
#: Where ``broker`` and ``agent_sdk`` live.
PROJECT_DIR = PACKAGE_DIR.parent
#: The build: ``broker/`` with the extensions, beside their shared runtime library.
NATIVE_DIR = PACKAGE_DIR / "_native"
NATIVE_MANIFEST = "manifest.json"
#: Set to run the Python source even when a fresh build exists.
PURE_PYTHON_ENV = "ORCH_PURE_PYTHON"


def module_source(name: str, project_dir: Path = PROJECT_DIR) -> Path:
    return project_dir.joinpath(*name.split(".")).with_suffix(".py")


def source_digests(project_dir: Path = PROJECT_DIR) -> dict[str, str]:
    """SHA-256 of each compiled module's source, by module name."""
    return {name: hashlib.sha256(module_source(name, project_dir).read_bytes()).hexdigest()
            for name in COMPILED_MODULES}


def native_check(native_dir: Path = NATIVE_DIR,
                 project_dir: Path = PROJECT_DIR) -> tuple[bool, str]:
    """Whether the build in ``native_dir`` may be loaded, and why (not)."""
    if os.environ.get(PURE_PYTHON_ENV):
        return False, f"{PURE_PYTHON_ENV} is set"
    try:
        manifest = json.loads((native_dir / NATIVE_MANIFEST).read_text())
    except FileNotFoundError:
        return False, "not built"
    except (OSError, ValueError) as e:
        return False, f"unreadable manifest: {e}"
    if manifest.get("python") != sys.implementation.cache_tag:
        return False, (f"built for {manifest.get('python')}, "
                       f"running {sys.implementation.cache_tag}")
    if manifest.get("modules") != source_digests(project_dir):
        return False, "the source changed since the build"
    return True, "fresh"


def _use_native() -> bool:
    usable, why = native_check()
    if not usable:
        if (NATIVE_DIR / NATIVE_MANIFEST).exists() and not os.environ.get(PURE_PYTHON_ENV):
            warnings.warn(f"broker: not loading the compiled hot paths ({why}); running the "
                          "Python source. Rebuild: python -m broker.native build",
                          RuntimeWarning, stacklevel=2)
        return False
    # The extensions of broker/_native/broker shadow the sources; their shared runtime
    # library sits in broker/_native itself and is imported by name.
    sys.path.append(str(NATIVE_DIR))
    __path__.insert(0, str(NATIVE_DIR / "broker"))  # type: ignore[name-defined]  # noqa: F821
    return True


#: Whether this process runs the compiled build of :data:`COMPILED_MODULES`.
compiled: bool = _use_native()
