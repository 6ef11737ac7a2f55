"""The method registry keyed by config class, and the shape of the house (imports)."""

from __future__ import annotations

from typing import Literal

import pytest

from pwf_core import registry
from pwf_core.config import ConfigError, parse_config
from pwf_core.methods import PWFN, PWFNConfig
from pwf_core.methods.rounds import FixingConfig, FixingMethod
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
