"""The layout of the code: every import arrow points down, and no module grows too long.

The packages, lowest first (README, "Architecture"): ``venue`` (the boundary) and
``sandbox`` (the venue's stand-in, which knows only the boundary); ``storage``;
``orders`` and ``reconciler``; ``heartbeat``; ``receiver``; ``otacm``, the roof. A
module may import from its own package and from lower ones only. The one arrow up is
the receiver's app factory taking the settings object (``otacm.settings.Settings``).

Imports are read from the source (every ``import`` statement, those inside functions
and under ``TYPE_CHECKING`` too), so an arrow cannot hide in a function body.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "venue": 0,
    "sandbox": 1,
    "storage": 1,
    "orders": 2,
    "reconciler": 2,
    "heartbeat": 3,
    "receiver": 4,
    "otacm": 5,
}
"""Each package's height: a module imports only from packages below its own."""

ALLOWED_UPWARD = {("receiver", "otacm.settings", "Settings")}
"""(package, module, name) imports that point up: the app factory takes the settings."""

MAX_MODULE_LINES = 700

NO_WEB_FRAMEWORK = ("orders", "heartbeat", "reconciler", "storage", "venue")
"""Packages whose modules must load without Flask: the worker and scheduler roles."""

WEB_FRAMEWORK = frozenset({"flask", "flask_wtf", "werkzeug", "wtforms", "gunicorn"})


@dataclass(frozen=True)
class Import:
    """One imported name (or module) in one module of the project."""

    module: str
    target: str
    name: str | None
    line: int


def _modules() -> Iterator[tuple[str, Path]]:
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(module: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    yield Import(module, submodule, None, node.lineno)
                else:
                    yield Import(module, base, alias.name, node.lineno)


IMPORTS = [found for module, path in MODULES.items() for found in _imports(module, path)]


def test_the_layout_is_read_from_every_package() -> None:
    """The checks below see every package, and imports in each (a broken reader sees none)."""
    assert {module.partition(".")[0] for module in MODULES} == set(LAYERS)
    assert {found.module.partition(".")[0] for found in IMPORTS} == set(LAYERS)


@pytest.mark.parametrize("package", list(LAYERS))
def test_every_import_arrow_points_down(package: str) -> None:
    """A module imports from its own package and lower ones; only the listed arrow goes up."""
    upward = []
    for found in IMPORTS:
        if found.module.partition(".")[0] != package:
            continue
        target = found.target.partition(".")[0]
        if target not in LAYERS or target == package or LAYERS[target] < LAYERS[package]:
            continue
        if (package, found.target, found.name) in ALLOWED_UPWARD:
            continue
        upward.append(
            f"{found.module}:{found.line} imports {found.target}"
            + (f".{found.name}" if found.name else "")
        )
    assert upward == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_the_limit(module: str) -> None:
    """A module holds one concept: past the limit, it holds several (split it by concept)."""
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines"


def _loads(module: str) -> set[str]:
    """Every module ``module`` may import, transitively: the project's and the outside's."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen or current not in MODULES:
            continue
        seen.add(current)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parts = current.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))
        for found in IMPORTS:
            if found.module != current:
                continue
            if found.target.partition(".")[0] in LAYERS:
                todo.append(found.target)
            else:
                outside.add(found.target.partition(".")[0])
    return seen | outside


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.partition(".")[0] in NO_WEB_FRAMEWORK)
)
def test_the_worker_and_scheduler_roles_load_no_web_framework(module: str) -> None:
    """``import orders.worker`` (or any job) loads neither Flask nor the web app's modules."""
    loaded = _loads(module)
    assert sorted(loaded & WEB_FRAMEWORK) == []
    assert sorted(m for m in loaded if m.partition(".")[0] in ("receiver", "otacm")) == []


def test_the_receiver_loads_flask_and_the_check_would_see_it() -> None:
    """The transitive reading finds a web framework where there is one."""
    assert "flask" in _loads("receiver.app")
    assert "orders.worker" in _loads("otacm.processes")
