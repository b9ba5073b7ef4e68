"""The CLI's layout: ``cli.main`` only assembles the group, and nothing in ``cli/`` imports it.

Read from the source with ``ast`` (no module is imported), walking every node, so that an
import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI_DIR = Path(__file__).resolve().parent.parent / "cli"
#: The scripts that start the CLI: they must import `cli.main`, and nothing imports them.
ENTRY_POINTS = {"cli.__main__"}


def module_name(path: Path, root: Path = CLI_DIR.parent) -> str:
    """``cli/tasks.py`` -> ``cli.tasks``; ``cli/__init__.py`` -> ``cli``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cli_modules() -> dict[str, Path]:
    """Every module of the ``cli`` package, by dotted name."""
    return {module_name(path): path for path in sorted(CLI_DIR.rglob("*.py"))}


def imported_names(path: Path, root: Path = CLI_DIR.parent) -> Iterator[str]:
    """Every module name an import in ``path`` may load, at any depth of the tree.

    ``from P import n`` yields both ``P`` and ``P.n`` (``n`` may be a submodule);
    relative imports are resolved against the module's package; a literal argument of
    ``importlib.import_module`` or ``__import__`` counts too.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                # `.` is the module's package, each further dot one package up.
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                              "__import__")):
            yield node.args[0].value


def cli_imports() -> dict[str, set[str]]:
    """For each ``cli`` module, the ``cli`` modules it imports."""
    modules = cli_modules()
    return {name: {imported for imported in imported_names(path) if imported in modules
                   and imported != name}
            for name, path in modules.items()}


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    package = tmp_path / "cli"
    package.mkdir()
    module = package / "probe.py"
    module.write_text("import cli.common\n\n\ndef f():\n    from .main import main\n"
                      "    import cli.main as m\n    from cli import main\n"
                      "    from . import main\n    importlib.import_module('cli.main')\n")
    names = list(imported_names(module, tmp_path))
    assert names.count("cli.main") == 5 and "cli.common" in names


@pytest.mark.parametrize("name", sorted(set(cli_modules()) - ENTRY_POINTS))
def test_no_cli_module_imports_cli_main(name: str) -> None:
    assert "cli.main" not in cli_imports()[name], (
        f"{name} imports cli.main: shared helpers belong in cli.common")


def test_nothing_imports_the_entry_points() -> None:
    importers = {name for name, imports in cli_imports().items() if imports & ENTRY_POINTS}
    assert not importers


def test_cli_modules_import_one_another_without_cycles() -> None:
    graph = cli_imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, path + (name,))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_cli_main_defines_only_the_group() -> None:
    tree = ast.parse((CLI_DIR / "main.py").read_text())
    defined = [node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert defined == ["main"], f"commands and helpers belong in their topic's module: {defined}"
