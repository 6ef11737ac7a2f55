"""The method registry keyed by config class, and the shape of the house (imports)."""

from __future__ import annotations

import ast
import subprocess
import sys
from typing import Literal

import pytest

from pwf_core import registry
from pwf_core.config import ConfigError, parse_config
from pwf_core.methods import PWFN, PWFNConfig
from pwf_core.methods.base import FixingConfig, FixingMethod
from tests.conftest import ROOT

PACKAGE = ROOT / "pwf_core"


class EchoConfig(FixingConfig):
    method: Literal["echo"] = "echo"
    loudness: int = 1


class Echo(FixingMethod):
    config_class = EchoConfig

    def fix(self, weights, target_fixed, round_index):
        raise NotImplementedError


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))


def test_the_name_comes_from_the_config_literal():
    assert PWFNConfig.method_name() == "pwfn"
    assert registry.method_class(PWFNConfig()) is PWFN
    assert registry.config_class("pwfn") is PWFNConfig


def test_a_new_method_plugs_into_the_config(clean_registry):
    registry.register_method(Echo)
    assert "echo" in registry.method_names()
    config = parse_config({"compression": {"method": "echo", "loudness": 3}})
    assert isinstance(config.compression, EchoConfig) and config.compression.loudness == 3
    assert isinstance(registry.create_method({"method": "echo"}), Echo)


def test_a_duplicate_name_is_refused(clean_registry):
    class OtherPWFNConfig(FixingConfig):
        method: Literal["pwfn"] = "pwfn"

    class Impostor(Echo):
        config_class = OtherPWFNConfig

    with pytest.raises(ValueError, match=r"method name 'pwfn' is taken by .*PWFNConfig"):
        registry.register_method(Impostor)
    assert registry.config_class("pwfn") is PWFNConfig


def test_unknown_method_names_its_field():
    with pytest.raises(ConfigError, match=r"compression: unknown method 'magic'; known: "):
        parse_config({"compression": {"method": "magic"}})


def _module_imports(path) -> set[str]:
    """``pwf_core`` modules imported at module level (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pwf_core"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pwf_core")}
    return found


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_pwf_core_has_no_import_cycle():
    graph = {_module_name(p): _module_imports(p) for p in PACKAGE.rglob("*.py")}
    assert "pwf_core.methods" not in str(graph["pwf_core.config"])

    def visit(node: str, path: list[str]) -> None:
        for child in graph.get(node, ()):
            # A package __init__ re-exports its children; importing a child runs it first, but
            # that is not an edge between the child's own imports.
            if child == "pwf_core" or (node.count(".") and child == node.rsplit(".", 1)[0]):
                continue
            assert child not in path, " -> ".join([*path, child])
            visit(child, [*path, child])

    for module in graph:
        if not module.endswith("__init__"):
            visit(module, [module])


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
