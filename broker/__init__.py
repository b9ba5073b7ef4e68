"""The Orchestrator broker: routes tasks from clients to agents over one ROUTER socket.

On import, the package looks for a compiled build of its hot modules (``python -m
broker.native build``, run by ``./setup.sh``) and uses it only while it matches the
source exactly, and only when the ``wire`` build it was compiled against is loaded too;
see :mod:`wire.native_build` and :mod:`broker.native`.
"""

from __future__ import annotations

from pathlib import Path

import wire
from wire.native_build import NATIVE_MANIFEST, PURE_PYTHON_ENV, NativeBuild
from wire.native_build import module_source as _module_source

__version__ = "0.1.0"

#: The broker's per-message modules, compiled as the mypyc group ``orchestrator_broker``
#: against the ``wire`` group (whose sources the build's manifest covers too).
BROKER_BUILD = NativeBuild(
    package="broker",
    modules=("broker.engine.circuit", "broker.engine.model", "broker.engine.quotas",
             "broker.engine.pending", "broker.engine.queues",
             "broker.engine.routing", "broker.engine.ledger", "broker.engine.lifecycle",
             "broker.engine.dispatch", "broker.engine.clients", "broker.engine.direct",
             "broker.engine.agents", "broker.engine.status", "broker.engine.restore",
             "broker.engine.engine", "broker.service", "broker.server"),
    group="orchestrator_broker",
    requires=(wire.WIRE_BUILD,),
)
#: Every module of the build, ``wire``'s included.
COMPILED_MODULES: tuple[str, ...] = BROKER_BUILD.all_modules()
PACKAGE_DIR = Path(__file__).resolve().parent
#: Where ``broker``, ``wire`` and ``agent_sdk`` live.
PROJECT_DIR = PACKAGE_DIR.parent
#: The build: ``broker/`` with the extensions, beside their shared runtime library.
NATIVE_DIR = BROKER_BUILD.native_dir

__all__ = [
    "BROKER_BUILD", "COMPILED_MODULES", "NATIVE_DIR", "NATIVE_MANIFEST", "PROJECT_DIR",
    "PURE_PYTHON_ENV", "compiled", "module_source", "native_check", "source_digests",
]


def module_source(name: str, project_dir: Path = PROJECT_DIR) -> Path:
    """The source file of dotted module ``name`` under ``project_dir``."""
    return _module_source(name, project_dir)


def source_digests(project_dir: Path = PROJECT_DIR) -> dict[str, str]:
    """SHA-256 of each compiled module's source (``wire``'s included), by module name."""
    return BROKER_BUILD.source_digests(project_dir)


def native_check(native_dir: Path = NATIVE_DIR,
                 project_dir: Path = PROJECT_DIR) -> tuple[bool, str]:
    """Whether the broker build in ``native_dir`` may be loaded, and why (not)."""
    return BROKER_BUILD.check(native_dir, project_dir)


#: Whether this process runs the compiled build of :data:`BROKER_BUILD`.
compiled: bool = BROKER_BUILD.load(__path__, required_loaded=wire.compiled)  # noqa: F821
