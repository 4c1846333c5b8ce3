"""The package's shape: subpackages in layers without an import cycle, imports of what exists, no private
helper used across modules, short signatures, and a step table that names every command and notebook."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
#: The package's layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = (
    ("spinemets", "errors", "provenance"),  # "spinemets": the package's __init__ (its version)
    ("fileio",),
    ("labels",),
    ("paths", "formats"),
    ("domain", "cohort"),
    ("training",),
    ("inference",),
    ("evaluation",),
    ("run",),
    ("report",),
    ("cli",),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "spinemets").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every spinemets module each module imports, at the top or inside a function (``from
    spinemets import __version__`` left out)."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spinemets"):
                assert node.level == 0, f"{name}: relative import"
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
        graph[name] = found - {name, "spinemets"}
    return graph


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle_between_modules_lazy_imports_included():
    graph = _imports(_modules())
    done, active, cycles = set(), [], []

    def visit(node):
        active.append(node)
        for nxt in sorted(graph[node]):
            if nxt in active:
                cycles.append(active[active.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        active.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    assert cycles == []


def test_subpackages_import_only_their_own_layer_or_lower_ones():
    layer = {group: i for i, groups in enumerate(LAYERS) for group in groups}
    graph = _imports(_modules())
    assert set(map(_group, graph)) <= set(layer)
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if _group(m) in layer and layer[_group(d)] > layer[_group(m)])
    assert upward == []


def test_every_import_names_something_that_exists():
    for name in _modules():
        importlib.import_module(name)


def test_no_private_helper_is_used_from_another_module():
    used = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spinemets"):
                used += [f"{name}: {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_") and not a.name.startswith("__")]
    assert used == []


def test_no_function_takes_more_than_eight_parameters():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                if params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                if len(params) > 8:
                    long.append(f"{name}.{node.name}: {len(params)}")
    assert long == []


def test_the_step_table_names_every_command_and_notebook():
    from spinemets.cli import build_parser

    readme = (REPO / "README.md").read_text()
    table = readme.split("| step | chapter | notebook | module | tests | command |", 1)[1].split("\n\n", 1)[0]
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert [c for c in commands if f"spinemets {c}" not in table and c != "jobs"] == []
    assert "spinemets jobs" in table
    notebooks = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))
    assert [n for n in notebooks if f"`{n}`" not in table] == []
    for module in set(re.findall(r"`((?:formats|cohort|training|inference|evaluation|run|report)\.\w+)", table)):
        importlib.import_module(f"spinemets.{module}")
