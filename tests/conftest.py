"""Shared fixtures: the digits dataset and a pretrained small CNN, built once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pwf_core.config import ExperimentConfig, load_config
from pwf_core.data import ImageDataset, load_dataset
from pwf_core.pretrain import build_experiment_model, pretrain

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@pytest.fixture(scope="session")
def digits_config() -> ExperimentConfig:
    """The shipped default experiment (digits + small CNN + PWFN)."""
    return load_config(DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def digits(digits_config: ExperimentConfig) -> ImageDataset:
    return load_dataset(digits_config.data)


@pytest.fixture(scope="session")
def pretrained_state(digits_config, digits):
    """State dict and test metrics of the default small CNN pretrained on digits (seeded)."""
    model = build_experiment_model(digits_config, digits)
    result = pretrain(model, digits, digits_config, "cpu", progress=False)
    return copy.deepcopy(model.state_dict()), result


@pytest.fixture
def pretrained_cnn(digits_config, digits, pretrained_state):
    """A fresh copy of the pretrained small CNN."""
    model = build_experiment_model(digits_config, digits)
    model.load_state_dict(pretrained_state[0])
    return model
