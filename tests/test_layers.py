"""The import rules of docs/design.md hold: each module imports only what its row allows.

The table under "Modules" in docs/design.md is the contract; this test reads it and every import
statement of the code (functions included), so the document cannot drift from the code.
"""

from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "fastkd": "fastkd",
    "kernels": "fastkd.kernels",
    "cli": "fastkd.cli",
    "bench": "fastkd.bench",
}
NAME = re.compile(r"`(fastkd(?:\.\w+)*)`")


def contract() -> dict[str, set[str]]:
    """Module (or package) -> the fastkd modules it may import, from the design's table."""
    rules = {}
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and NAME.fullmatch(cells[0]):
            rules[cells[0].strip("`")] = set(NAME.findall(cells[2]))
    return rules


def unit_of(module: str, units: set[str]) -> str | None:
    """The table row that covers ``module``: itself, or the package it lies in."""
    while module:
        if module in units:
            return module
        module = module.rpartition(".")[0]
    return None


def imports() -> dict[str, set[str]]:
    """Module name -> the fastkd modules its code imports (``fastkd`` itself left out)."""
    found = {}
    for folder, package in FOLDERS.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = file.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            names = set()
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
            found[name] = {n for n in names if n.startswith("fastkd.")}
    del found["fastkd"]  # the package root: its version and the public names, imported lazily
    return found


def test_the_design_table_covers_every_module():
    units = set(contract())
    missing = sorted(m for m in imports() if unit_of(m, units) is None)
    assert not missing, f"modules without a row in docs/design.md: {missing}"


def test_every_import_is_allowed_by_the_design():
    rules = contract()
    units = set(rules)
    broken = []
    for module, targets in sorted(imports().items()):
        source = unit_of(module, units)
        for target in sorted(targets):
            goal = unit_of(target, units)
            if goal not in (source, None) and goal not in rules[source]:
                broken.append(f"{module} imports {target} ({source} may not import {goal})")
    assert not broken, "\n".join(broken)


def test_the_allowed_imports_have_no_cycle():
    rules = contract()
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for goal in sorted(rules.get(unit, ())):
            assert state.get(goal) != "open", f"cycle: {' -> '.join([*path, unit, goal])}"
            if goal not in state:
                visit(goal, [*path, unit])
        state[unit] = "done"

    for unit in sorted(rules):
        if unit not in state:
            visit(unit, [])


FILE = re.compile(r"\.(csv|json|png|pt|txt|md|py|tar|zarr|npz|yaml)$")  # file names, not code
SYMBOL = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`")


def owned() -> dict[str, list[str]]:
    """Module (or package) -> the Python names its "owns" cell names in backticks (file names,
    options and expressions, which are not plain or dotted identifiers, are left out): the
    modules table, and the training package's own table (``fastkd.training.<module>``)."""
    table = {}
    section = ""
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        section = line if line.startswith("## ") else section
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and NAME.fullmatch(cells[0]):
            unit, owns = cells[0].strip("`"), cells[1]
        elif section.startswith("## Training") and len(cells) == 2 and SYMBOL.fullmatch(cells[0]):
            unit, owns = f"fastkd.training.{cells[0].strip('`')}", cells[1]
        else:
            continue
        names = SYMBOL.findall(owns)
        table[unit] = [n for n in names if not n.startswith("fastkd") and not FILE.search(n)]
    return table


def _defined_in(unit: str, dotted: str) -> bool:
    """``dotted`` names something of ``unit``: an attribute it defines (a class or function
    whose home is ``unit`` or one of its submodules, not one it imports from elsewhere; any
    other value), or a submodule (and what lies in it)."""
    target: object = importlib.import_module(unit)
    for part in dotted.split("."):
        if hasattr(target, part):
            target = getattr(target, part)
            continue
        name = getattr(target, "__name__", None)
        if not isinstance(target, types.ModuleType) or name is None:
            return False
        try:
            target = importlib.import_module(f"{name}.{part}")
        except ModuleNotFoundError:
            return False
    home = getattr(target, "__module__", None)
    if isinstance(target, type | types.FunctionType) and home is not None:
        return home == unit or home.startswith(f"{unit}.")
    return True


def test_every_name_the_owns_column_gives_a_module_lies_in_it():
    """The "owns" column is true to the code: each name it gives a module (a class, function,
    constant, or a submodule of a package) exists there, and a class or function is defined
    there, not imported from another module's home, so the table cannot drift."""
    missing = []
    for unit, names in sorted(owned().items()):
        missing += [f"{unit}: {name}" for name in names if not _defined_in(unit, name)]
    assert not missing, "names the design's owns column gives, not in the code:\n" + "\n".join(
        missing
    )
