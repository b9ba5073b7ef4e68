"""Compiled hot paths: ``python -m broker.native build|status|clean``.

The per-message code (:data:`broker.COMPILED_MODULES`: the ``wire`` package's codecs and
socket helpers, and the broker's task engine and server) is plain, fully typed Python;
mypyc compiles the same source to C extensions, in two groups: ``wire`` (which agents
and clients load too) and ``broker`` (compiled against it, loaded only by the broker).
On the 2-core development VM that cut the broker's CPU per task from 24-28 to 17-19 us
and raised the throughput benchmark from 0.41-0.50 to 0.64 of ``zmq.proxy``
(docs/performance.md).

Not the SDK: compiled code checks at run time the types that typeshed
gives third-party calls, and the SDK's asyncio code met a loop whose ``remove_reader``
returns None where typeshed says bool.

``build`` writes the extensions to ``wire/_native/`` and ``broker/_native/``, each with a
manifest of the source hashes it was built from. Each package's ``__init__`` loads its
build only while every hash still matches (and the interpreter is the one they were built for); otherwise it warns
and runs the Python source, so an edit is never shadowed by a stale build. Set
``ORCH_PURE_PYTHON=1`` to run the source regardless. ``./setup.sh`` builds when a
compiler and mypy are available and carries on in pure Python when not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

import broker
import wire
from broker import BROKER_BUILD, COMPILED_MODULES, NATIVE_DIR, PROJECT_DIR, native_check
from wire.native_build import NATIVE_MANIFEST, NativeBuild, module_source


def _install(staging: Path, build: NativeBuild, digests: dict[str, str]) -> None:
    """Move one group's extensions and shared library from the build output into the
    package's ``_native`` directory, with its manifest, replacing any older build."""
    target = Path(tempfile.mkdtemp(prefix="_native.", dir=build.package_dir))
    try:
        shutil.move(str(staging / build.package), str(target / build.package))
        for library in staging.glob(f"{build.group}__mypyc*"):
            shutil.move(str(library), str(target / library.name))
        (target / NATIVE_MANIFEST).write_text(json.dumps(
            {"python": sys.implementation.cache_tag, "modules": digests}, indent=1))
        if build.native_dir.exists():
            shutil.rmtree(build.native_dir)
        target.rename(build.native_dir)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def build(project_dir: Path = PROJECT_DIR) -> None:
    """Compile :data:`wire.WIRE_BUILD` and :data:`broker.BROKER_BUILD`, one mypyc group
    each (so that an agent loads no broker code), into their ``_native`` directories.

    Raises:
        RuntimeError: mypyc or the C compiler failed (their output says why).
        ImportError: mypy (which provides mypyc) is not installed.
    """
    from mypyc.build import mypycify  # the dev extra installs mypy
    from setuptools import Distribution

    builds = (wire.WIRE_BUILD, BROKER_BUILD)
    digests = {b.package: b.source_digests(project_dir) for b in builds}
    with tempfile.TemporaryDirectory(prefix="orch-native-") as scratch:
        staging = Path(scratch) / "lib"
        cwd = os.getcwd()
        try:
            # mypycify names modules after paths relative to the working directory.
            os.chdir(project_dir)
            groups: list[tuple[list[str], str | None]] = [([str(module_source(name, project_dir).relative_to(project_dir))
                        for name in b.modules], b.group) for b in builds]
            try:
                extensions = mypycify([path for paths, _ in groups for path in paths],
                                      opt_level="3", target_dir=str(Path(scratch) / "c"),
                                      separate=groups)
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
        finally:
            os.chdir(cwd)
        for b in builds:
            _install(staging, b, digests[b.package])


@contextlib.contextmanager
def _output_kept_unless_failed() -> Iterator[None]:
    """Send what the build prints (mypyc's notes, the C compiler's lines: ``sys.stdout``
    and ``sys.stderr`` and file descriptors 1 and 2, subprocesses included) to a scratch
    file, and show it on stderr only when the build fails: a first run prints one line,
    not a page of compiler notes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        try:
            with open(log.fileno(), "w", closefd=False) as text, \
                    contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                try:
                    yield
                finally:
                    text.flush()
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", "replace"))
            sys.stderr.flush()
            raise
        finally:
            os.close(saved[0])
            os.close(saved[1])


def clean() -> bool:
    """Remove both builds; True when there was one."""
    removed = False
    for directory in (wire.WIRE_BUILD.native_dir, NATIVE_DIR):
        if directory.exists():
            shutil.rmtree(directory)
            removed = True
    return removed


def status() -> dict[str, Any]:
    """Whether fresh builds exist and whether this process loaded them."""
    usable, why = native_check()
    wire_usable, wire_why = wire.WIRE_BUILD.check()
    return {"built": (NATIVE_DIR / NATIVE_MANIFEST).exists(), "usable": usable, "reason": why,
            "loaded": broker.compiled, "modules": list(COMPILED_MODULES),
            "directory": str(NATIVE_DIR),
            "wire": {"usable": wire_usable, "reason": wire_why, "loaded": wire.compiled,
                     "directory": str(wire.WIRE_BUILD.native_dir)}}


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
        print("compiling the broker's hot paths with mypyc (about a minute, once; "
              "everything runs without it)", file=sys.stderr)
        try:
            with _output_kept_unless_failed():
                build()
        except ImportError as e:
            print(f"error: mypyc is not installed ({e}); install the dev extra: "
                  "pip install -e '.[dev]'", file=sys.stderr)
            return 1
        except (RuntimeError, OSError) as e:
            print(f"error: {e}; the broker keeps running the Python source", file=sys.stderr)
            return 1
        print(f"compiled {len(COMPILED_MODULES)} modules into {NATIVE_DIR} and "
              f"{wire.WIRE_BUILD.native_dir}", file=sys.stderr)
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
