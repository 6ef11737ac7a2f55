"""The house's import rules: one direction (no circle, counting every import: function-level,
``TYPE_CHECKING`` and re-exports through a package), ``pwf_core`` free of orchestration, and
importing the library changing nothing in the process."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT


def _modules(roots: list[Path]) -> dict[str, Path]:
    found = {}
    for root in roots:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """``(module, name)`` pairs an import statement reaches (``name`` for ``from m import n``)."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [(base, alias.name) for alias in node.names]


def import_edges(roots: list[Path]) -> dict[str, set[str]]:
    """Which of the project's modules each one imports, anywhere in its body.

    ``from package import name`` counts as an import of the module that ``package``'s
    ``__init__`` takes ``name`` from (a re-export hides no dependency); an import of a module
    inside a package is not an import of the package's ``__init__`` (Python initialises parent
    packages first, which is not a dependency between the modules).
    """
    modules = _modules(roots)
    exports: dict[str, dict[str, str]] = {}  # package -> name -> module it comes from
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    for name, tree in trees.items():
        if modules[name].name != "__init__.py":
            continue
        for node in tree.body:
            for target, alias in _imported(node, name, True):
                if alias is not None and target in modules:
                    exports.setdefault(name, {})[alias] = target

    def resolve(target: str, alias: str | None) -> str | None:
        if alias is not None and f"{target}.{alias}" in modules:
            return f"{target}.{alias}"
        if alias is not None and alias in exports.get(target, {}):
            return resolve(exports[target][alias], None)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        is_package = modules[name].name == "__init__.py"
        for node in ast.walk(tree):
            for target, alias in _imported(node, name, is_package):
                found = resolve(target, alias)
                if found is None or found == name:
                    continue
                if modules[found].name == "__init__.py" and name.startswith(found + "."):
                    continue  # a module of a package, and the package it sits in
                edges[name].add(found)
    return edges


def find_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (``a -> b -> a``)."""
    circles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for child in sorted(edges.get(node, ())):
            if child in path:
                circle = [*path[path.index(child) :], child]
                if frozenset(circle) not in done:
                    done.add(frozenset(circle))
                    circles.append(circle)
            elif len(path) < 40:
                visit(child, [*path, child])

    for module in sorted(edges):
        visit(module, [module])
    return circles


def test_no_import_circle_in_pwf_core_or_pwf_flows():
    edges = import_edges([ROOT / "pwf_core", ROOT / "pwf_flows"])
    circles = find_circles(edges)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)
    assert not any(m.startswith("pwf_flows") for m in edges["pwf_core.api"])  # a floor below


def test_nothing_below_the_experiment_config_imports_it():
    edges = import_edges([ROOT / "pwf_core"])
    users = {m for m, imported in edges.items() if "pwf_core.config.schema" in imported}
    above = {"pwf_core.config", "pwf_core.config.overrides", "pwf_core.config.files"}
    assert users <= above | {"pwf_core", "pwf_core.api", "pwf_core.preflight", "pwf_core.pretrain"}


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_check_finds_a_planted_circle(tmp_path):
    """Circles that only a function-level import, a TYPE_CHECKING block or a package's
    re-export shows: each is found."""
    planted = _package(
        tmp_path / "planted",
        {
            "__init__.py": "from planted.c import Thing\n",
            "a.py": "def late():\n    from planted import b\n",
            "b.py": "from planted.a import late\n",
            "c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from planted.d import Other\n"
                "class Thing: ...\n"
            ),
            "d.py": "from planted import Thing\nclass Other: ...\n",
            "e.py": "from planted.a import late\n",  # depends on a circle, is not in one
        },
    )
    circles = {frozenset(circle) for circle in find_circles(import_edges([planted]))}
    assert circles == {
        frozenset({"planted.a", "planted.b"}),
        frozenset({"planted.c", "planted.d"}),
    }


def test_pwf_core_imports_no_orchestration():
    code = (
        "import importlib, pkgutil, sys, pwf_core\n"
        "for m in pkgutil.walk_packages(pwf_core.__path__, 'pwf_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'optuna'})\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_library_changes_nothing_in_the_process():
    code = (
        "import json, os\n"
        # What the libraries pwf builds on do when imported is theirs (torch sets an Inductor
        # cache folder): they are imported first.
        "import torch, torch._inductor.config, timm, prefect, mlflow, optuna, sklearn\n"
        "before = dict(os.environ)\n"
        "import pwf_core, pwf_core.models, pwf_flows, pwf_flows.cli, pwf_flows.environment\n"
        "import pwf_flows.experiment, pwf_flows.sweep.flow, pwf_flows.tracking\n"
        "after = dict(os.environ)\n"
        "print(json.dumps(sorted(set(after.items()) ^ set(before.items()))))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
