"""The compiled hot paths are loaded only when they match the source exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker import (
    COMPILED_MODULES, NATIVE_MANIFEST, PURE_PYTHON_ENV, module_source, native_check,
    source_digests,
)
from broker.native import _output_kept_unless_failed
from tests.conftest import Cluster, python_process, read_json_line

ROOT = Path(__file__).resolve().parent.parent.parent


def fake_build(tmp_path: Path, **overrides: object) -> tuple[Path, Path]:
    """A project dir with the compiled modules' sources and a manifest of their hashes."""
    project = tmp_path / "project"
    for name in COMPILED_MODULES:
        source = module_source(name, project)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {name}\n")
    native = tmp_path / "native"
    native.mkdir()
    manifest = {"python": sys.implementation.cache_tag, "modules": source_digests(project)}
    manifest.update(overrides)
    (native / NATIVE_MANIFEST).write_text(json.dumps(manifest))
    return native, project


@pytest.fixture(autouse=True)
def _no_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)


def test_a_build_matching_the_source_is_used(tmp_path: Path) -> None:
    native, package = fake_build(tmp_path)
    assert native_check(native, package) == (True, "fresh")


def test_an_edited_source_disables_the_build(tmp_path: Path) -> None:
    native, package = fake_build(tmp_path)
    module_source("broker.server", package).write_text("# server, edited\n")
    assert native_check(native, package) == (False, "the source changed since the build")


def test_a_build_for_another_interpreter_is_not_used(tmp_path: Path) -> None:
    native, package = fake_build(tmp_path, python="cpython-99")
    usable, why = native_check(native, package)
    assert not usable and "cpython-99" in why


def test_no_build_or_a_broken_manifest_means_python(tmp_path: Path) -> None:
    native, package = fake_build(tmp_path)
    (native / NATIVE_MANIFEST).write_text("{not json")
    assert native_check(native, package)[0] is False
    (native / NATIVE_MANIFEST).unlink()
    assert native_check(native, package) == (False, "not built")


def test_the_environment_switch_forces_python(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    native, package = fake_build(tmp_path)
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    assert native_check(native, package) == (False, f"{PURE_PYTHON_ENV} is set")


def test_a_process_loads_what_the_check_says() -> None:
    """In a fresh interpreter: compiled modules come from broker/_native exactly when the
    real build is fresh, and never with the environment switch."""
    probe = ("import broker, broker.server as s, broker.journal as j; "
             "print(broker.compiled, s.__file__.endswith('.py'), j.__file__.endswith('.py'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    usable = native_check()[0]
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(usable), str(not usable), "True"]  # journal is never compiled
    out = subprocess.run([sys.executable, "-c", probe], env={**env, PURE_PYTHON_ENV: "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_an_engine_module_imported_first_is_the_one_the_server_uses() -> None:
    """``import broker.engine.queues`` before ``broker.server`` (as broker.journal does)
    must give the compiled module the server then uses, never a source copy beside it:
    two copies made "TaskRecord object expected; got TaskRecord" and stored payloads
    that one copy did not recognise."""
    probe = ("import sys, broker, broker.engine.queues as q, broker.engine.model as m; "
             "import broker.server; "
             "print(broker.compiled, sys.modules['broker.engine.queues'] is q, "
             "sys.modules['broker.engine.model'] is m, q.__file__.endswith('.py'))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    compiled, same_queues, same_model, source = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True,
        check=True).stdout.split()
    assert (same_queues, same_model) == ("True", "True")
    assert source == str(compiled == "False")


@pytest.mark.parametrize("pure", [True, False])
def test_a_broker_serves_tasks_as_python_and_compiled(cluster: Cluster, tmp_path: Path,
                                                      pure: bool) -> None:
    """The fallback is a whole working broker, not only an import: with the switch set
    (and, when a build exists, without it) a broker process and an agent serve a task,
    and STATUS says which code ran."""
    if not pure and not native_check()[0]:
        pytest.skip("no fresh compiled build here (python -m broker.native build)")
    env = {PURE_PYTHON_ENV: "1"} if pure else {}
    broker_proc = python_process("-m", "broker", "--bind", "127.0.0.1:0", "--data-dir",
                                 str(tmp_path / "data"), "--log-level", "WARNING", env=env)
    cluster.procs.append(broker_proc)
    url = read_json_line(broker_proc)["endpoint"]
    cluster.agent(url)
    client = cluster.client(url)
    result = client.submit(capabilities=["echo"], data={"n": 7}).result(timeout=30)
    assert result.ok and result.data == {"n": 7}
    assert client.status()["broker"]["compiled"] is (not pure)


def test_the_build_prints_its_compiler_output_only_when_it_fails(
        capfd: pytest.CaptureFixture[str]) -> None:
    # Given what mypyc prints and what a compiler subprocess writes to its stderr
    def noisy() -> None:
        print("broker/server.py:201: warning: Treating generator comprehension as list")
        subprocess.run(["sh", "-c", "echo 'gcc: note' >&2"], check=True)

    # When a build succeeds: none of it shows
    with _output_kept_unless_failed():
        noisy()
    assert capfd.readouterr() == ("", "")
    # When it fails: all of it shows, on stderr, for the user to read
    with pytest.raises(RuntimeError), _output_kept_unless_failed():
        noisy()
        raise RuntimeError("compiling the hot modules failed")
    err = capfd.readouterr().err
    assert "gcc: note" in err and "Treating generator comprehension" in err
