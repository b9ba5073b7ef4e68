"""Compiled hot paths: ``python -m broker.native build|status|clean``.

The broker's per-message code (:data:`broker.COMPILED_MODULES`: its sockets, tasks,
routing, protocol and server modules) is plain, fully typed Python; mypyc compiles the
same source to C extensions, which agents and clients use too (protocol and sockets).
On the 2-core development VM that cut the broker's CPU per task from 24-28 to 17-19 us
and raised the throughput benchmark from 0.41-0.50 to 0.64 of ``zmq.proxy``
(docs/performance.md).

Only the broker's modules: compiled code checks at run time the types that typeshed
gives third-party calls, and the SDK's asyncio code met a loop whose ``remove_reader``
returns None where typeshed says bool.

``build`` writes the extensions to ``broker/_native/`` with a manifest of the source
hashes they were built from. ``broker/__init__.py`` loads them only while every hash
still matches (and the interpreter is the one they were built for); otherwise it warns
and runs the Python source, so an edit is never shadowed by a stale build. Set
``ORCH_PURE_PYTHON=1`` to run the source regardless. ``./setup.sh`` builds when a
compiler and mypy are available and carries on in pure Python when not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

import broker
from broker import (
    COMPILED_MODULES, NATIVE_DIR, NATIVE_MANIFEST, PROJECT_DIR, module_source, native_check,
    source_digests,
)


def build(native_dir: Path = NATIVE_DIR, project_dir: Path = PROJECT_DIR) -> None:
    """Compile :data:`COMPILED_MODULES` into ``native_dir`` (replaced atomically).

    Raises:
        RuntimeError: mypyc or the C compiler failed (their output says why).
        ImportError: mypy (which provides mypyc) is not installed.
    """
    from mypyc.build import mypycify  # the dev extra installs mypy
    from setuptools import Distribution

    digests = source_digests(project_dir)
    with tempfile.TemporaryDirectory(prefix="orch-native-") as scratch:
        staging = Path(tempfile.mkdtemp(prefix="_native.", dir=native_dir.parent))
        cwd = os.getcwd()
        try:
            # mypycify names modules after paths relative to the working directory.
            os.chdir(project_dir)
            try:
                extensions = mypycify(
                    [str(module_source(name, project_dir).relative_to(project_dir))
                     for name in COMPILED_MODULES],
                    opt_level="3", target_dir=str(Path(scratch) / "c"),
                    group_name="orchestrator_broker")
            except SystemExit as e:  # mypyc exits when type checking fails
                raise RuntimeError(f"mypyc refused the source (exit {e.code}); "
                                   "see the type errors above") from e
            distribution = Distribution({"name": "orchestrator-native",
                                         "ext_modules": extensions})
            command = distribution.get_command_obj("build_ext")
            command.build_lib = str(staging)  # type: ignore[attr-defined]
            command.build_temp = str(Path(scratch) / "obj")  # type: ignore[attr-defined]
            try:
                distribution.run_command("build_ext")
            except SystemExit as e:  # distutils reports compiler failures this way
                raise RuntimeError(f"compiling the hot modules failed: {e}") from e
            (staging / NATIVE_MANIFEST).write_text(json.dumps(
                {"python": sys.implementation.cache_tag, "modules": digests}, indent=1))
            if native_dir.exists():
                shutil.rmtree(native_dir)
            staging.rename(native_dir)
        finally:
            os.chdir(cwd)
            shutil.rmtree(staging, ignore_errors=True)


def clean(native_dir: Path = NATIVE_DIR) -> bool:
    """Remove the build; True when there was one."""
    if not native_dir.exists():
        return False
    shutil.rmtree(native_dir)
    return True


def status() -> dict[str, Any]:
    usable, why = native_check()
    return {"built": (NATIVE_DIR / NATIVE_MANIFEST).exists(), "usable": usable, "reason": why,
            "loaded": broker.compiled, "modules": list(COMPILED_MODULES),
            "directory": str(NATIVE_DIR)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.native",
                                     description="Build, check or remove the compiled hot paths.")
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="compile the hot modules with mypyc")
    build_cmd.add_argument("--if-needed", action="store_true",
                           help="do nothing when a fresh build exists")
    status_cmd = sub.add_parser("status", help="is a fresh build there, and is it loaded")
    status_cmd.add_argument("--json", action="store_true", help="print one JSON document")
    sub.add_parser("clean", help="remove the build (run the Python source)")
    args = parser.parse_args(argv)
    if args.command == "build":
        if args.if_needed and native_check()[0]:
            print("compiled hot paths are up to date", file=sys.stderr)
            return 0
        try:
            build()
        except ImportError as e:
            print(f"error: mypyc is not installed ({e}); install the dev extra: "
                  "pip install -e '.[dev]'", file=sys.stderr)
            return 1
        except (RuntimeError, OSError) as e:
            print(f"error: {e}; the broker keeps running the Python source", file=sys.stderr)
            return 1
        print(f"compiled {', '.join(COMPILED_MODULES)} into {NATIVE_DIR}", file=sys.stderr)
        return 0
    if args.command == "status":
        report = status()
        if args.json:
            print(orjson.dumps(report).decode())
        else:
            print(f"built: {report['built']}  usable: {report['usable']} ({report['reason']})  "
                  f"loaded in this process: {report['loaded']}")
        return 0
    removed = clean()
    print("removed the compiled hot paths" if removed else "nothing to remove", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
