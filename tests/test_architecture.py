"""The walls between the packages, and the size rules, checked on the source itself.

- ``wire`` imports nothing of ours; ``agent_sdk`` never imports ``broker``; ``broker``
  never imports ``agent_sdk``, ``cli``, ``workflows`` or ``agents``; ``workflows`` and
  ``agents`` reach the broker only through ``agent_sdk``; ``cli`` may start the broker.
  Every import node counts, those inside functions too, and a fresh interpreter per
  package shows what importing it really loads.
- No class over 400 lines (a mixin's lines count toward the class that uses it); no
  function over 60 lines in ``broker/`` or ``wire/`` except the hot paths named below.
- A task's state is assigned only in ``broker/engine/lifecycle.py``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("wire", "broker", "agent_sdk", "cli", "workflows", "agents", "nodes")
#: package -> the packages of ours it must never import
WALLS: dict[str, tuple[str, ...]] = {
    "wire": ("broker", "agent_sdk", "cli", "workflows", "agents"),
    "agent_sdk": ("broker", "cli", "workflows", "agents"),
    "broker": ("agent_sdk", "cli", "workflows", "agents"),
    "workflows": ("broker", "cli"),
    "agents": ("broker", "cli"),
    # A node supervisor runs agents as processes: it never loads their code, nor the
    # broker's.
    "nodes": ("broker", "agent_sdk", "workflows", "agents"),
}
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60
#: Functions allowed past MAX_FUNCTION_LINES, each with why. They run once per message or
#: per task; splitting them costs a call (and the locals hoisted out of the loop) each time.
HOT_PATH_EXEMPTIONS: dict[str, str] = {
    "broker/engine/clients.py:ClientDesk.submit":
        "the per-task loop of SUBMIT, 1.2 us a task compiled (500-task batches): attribute "
        "lookups hoisted into locals and one requirement lookup per run of equal tasks; a "
        "helper call per task would be a few percent of that",
    "wire/tasks.py:_decode_header":
        "one match over every task command, 1.1 us for a one-item RESULT compiled: a "
        "second dispatch per message would add to every message the broker reads",
}
#: Where ``<x>.state = ...`` may appear in broker/: the task lifecycle, the records'
#: constructors, the agent table's one setter, the circuit breaker's own state.
STATE_ASSIGNMENTS_ALLOWED = {
    "broker/engine/lifecycle.py", "broker/engine/model.py", "broker/engine/routing.py",
    "broker/engine/circuit.py",
}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_native" not in p.parts)


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package of ours, line) for every import node in the file."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(parsed(path)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in OURS:
                found.add((top, node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(WALLS))
def test_no_import_crosses_a_wall(package: str) -> None:
    forbidden = WALLS[package]
    breaches = [f"{path.relative_to(ROOT)}:{line} imports {top}"
                for path in modules(package) for top, line in imported_packages(path)
                if top in forbidden]
    assert not breaches, "\n".join(breaches)


@pytest.mark.parametrize("package,statement", [
    ("wire", "import wire, wire.tasks, wire.state, wire.bus, wire.codec, wire.sockets"),
    ("agent_sdk", "import agent_sdk, agent_sdk.state, agent_sdk.messaging"),
])
def test_importing_a_package_loads_nothing_behind_its_wall(package: str,
                                                           statement: str) -> None:
    # Given a fresh interpreter (compiled builds loaded where they are fresh)
    probe = (f"{statement}; import sys; print('\\n'.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, check=True, timeout=60).stdout.split()
    forbidden = WALLS[package]
    # Then no module of a forbidden package, nor the broker's compiled library, is loaded
    breaches = [m for m in loaded
                if m.split(".")[0] in forbidden or m.startswith("orchestrator_broker")]
    assert not breaches


def class_lines(tree: ast.Module) -> dict[str, tuple[int, list[str]]]:
    """Class name -> (its own lines, the names of its bases)."""
    classes: dict[str, tuple[int, list[str]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None
            bases = [b.id if isinstance(b, ast.Name) else b.attr
                     for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]
            classes[node.name] = (node.end_lineno - node.lineno + 1, bases)
    return classes


def test_no_class_is_over_the_limit() -> None:
    # Every class of ours by name: a mixin's lines count toward each class that uses it
    # (a base class's do not: an agent is not as big as BaseAgent plus its own code).
    files = [p for package in OURS if (ROOT / package).is_dir() for p in modules(package)]
    classes: dict[str, tuple[int, list[str], Path]] = {}
    for path in files:
        for name, (lines, bases) in class_lines(parsed(path)).items():
            classes[name] = (lines, bases, path)

    def total(name: str, seen: frozenset[str] = frozenset()) -> int:
        lines, bases, _ = classes[name]
        return lines + sum(total(b, seen | {name}) for b in bases
                           if b in classes and b not in seen and b.endswith("Mixin"))

    too_big = [f"{path.relative_to(ROOT)}: {name} ({total(name)} lines)"
               for name, (_, _, path) in classes.items() if total(name) > MAX_CLASS_LINES]
    assert not too_big, "\n".join(too_big)


def long_functions(path: Path) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((f"{prefix}{child.name}", lines))
                visit(child, f"{prefix}{child.name}.")

    visit(parsed(path), "")
    return found


def test_no_function_in_broker_or_wire_is_over_the_limit() -> None:
    too_long = []
    for package in ("broker", "wire"):
        for path in modules(package):
            for name, lines in long_functions(path):
                key = f"{path.relative_to(ROOT)}:{name}"
                if key not in HOT_PATH_EXEMPTIONS:
                    too_long.append(f"{key} ({lines} lines)")
    assert not too_long, "\n".join(too_long)


def test_every_exemption_is_still_needed() -> None:
    still_long = {f"{path.relative_to(ROOT)}:{name}"
                  for package in ("broker", "wire") for path in modules(package)
                  for name, _ in long_functions(path)}
    assert set(HOT_PATH_EXEMPTIONS) <= still_long, \
        f"exempt but short now: {sorted(set(HOT_PATH_EXEMPTIONS) - still_long)}"


def test_a_task_state_changes_only_in_the_lifecycle() -> None:
    breaches = []
    for path in modules("broker"):
        relative = str(path.relative_to(ROOT))
        if relative in STATE_ASSIGNMENTS_ALLOWED or relative.startswith("broker/state/"):
            continue
        for node in ast.walk(parsed(path)):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            breaches.extend(f"{relative}:{node.lineno}" for target in targets
                            if isinstance(target, ast.Attribute) and target.attr == "state")
    assert not breaches, "state assigned outside broker/engine/lifecycle.py:\n" + \
        "\n".join(breaches)
