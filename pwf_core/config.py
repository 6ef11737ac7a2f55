"""The one typed experiment config, validated at the edge.

Everything a run depends on lives in :class:`ExperimentConfig`: its hash keys caches, its
flattened form is what trackers record as parameters, and sweeps name its dotted fields.
Bad values fail with :class:`ConfigError`, whose message names each offending field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

PAPER_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which network to compress.

    Args:
        name: ``small_cnn`` (pwf's own) or any timm architecture name.
        weights: Optional local file (safetensors or ``.pt``) with trained weights; when given,
            pretraining starts from it instead of from a random init.
        kwargs: Extra architecture arguments, e.g. ``{patch_size: 2}`` for a ViT on 8x8 inputs.
    """

    name: str = "small_cnn"
    weights: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from pwf_core.models import is_known_model, similar_model_names

        if not is_known_model(name):
            hint = similar_model_names(name)
            suffix = f"; did you mean one of {hint}?" if hint else ""
            raise ValueError(f"unknown model '{name}' (not small_cnn and not a timm model){suffix}")
        return name

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, weights: Path | None) -> Path | None:
        if weights is not None and not weights.is_file():
            raise ValueError(f"weights file '{weights}' does not exist")
        return weights


class DataConfig(_Section):
    """Which dataset, and where it lives.

    Args:
        name: ``digits`` ships with scikit-learn (the default); ``mnist`` reads IDX files,
            ``cifar10`` the python batches, ``imagefolder`` an ImageNet-style train/val tree.
        path: Folder of the data; required for every dataset but ``digits``.
        val_fraction: Share of the training split held out for validation.
        img_size: Input side for ``imagefolder`` (other datasets have a native size).
        num_workers: DataLoader workers for ``imagefolder``; in-memory datasets need none.
        eval_batch_size: Batch size for evaluation.
    """

    name: Literal["digits", "mnist", "cifar10", "imagefolder"] = "digits"
    path: Path | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    img_size: PositiveInt = 224
    num_workers: NonNegativeInt = 4
    eval_batch_size: PositiveInt = 512

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_dir():
            raise ValueError(f"dataset path '{path}' does not exist or is not a folder")
        return path

    @model_validator(mode="after")
    def _path_given(self) -> DataConfig:
        if self.name != "digits" and self.path is None:
            raise ValueError(f"data.path is required for dataset '{self.name}'")
        return self


class OptimConfig(_Section):
    """Optimiser settings shared by pretraining and the training between fixing rounds."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 1e-3
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: NonNegativeFloat = 1e-4
    grad_clip: PositiveFloat | None = 1.0
    batch_size: PositiveInt = 64


class PretrainConfig(OptimConfig):
    """Deterministic training before conversion. ``epochs: 0`` uses the weights as given."""

    epochs: NonNegativeFloat = 20.0
    lr: PositiveFloat = 0.05
    cosine: bool = True


class RoundTrainConfig(OptimConfig):
    """Training of the free weights before each fixing round.

    Args:
        epochs: Epochs before every round but the first.
        first_round_epochs: Epochs before the first round (the paper: 5 % of one epoch).
    """

    epochs: NonNegativeFloat = 3.0
    first_round_epochs: NonNegativeFloat = 0.05

    def epochs_before(self, round_index: int) -> float:
        """Epochs of training that precede fixing round ``round_index``."""
        return self.first_round_epochs if round_index == 0 else self.epochs


class FixingConfig(_Section):
    """Knobs every fixing method has; each method extends it with its own.

    Args:
        method: Registered method name (``pwfn``, ``wfn``, ``kmeans``, ``uniform``).
        schedule: Fraction of converted weights fixed after each round; strictly increasing,
            in (0, 1], ending at 1.0.
    """

    method: str = "pwfn"
    schedule: tuple[float, ...] = PAPER_SCHEDULE

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, schedule: tuple[float, ...]) -> tuple[float, ...]:
        if not schedule:
            raise ValueError("schedule is empty")
        if any(not 0.0 < f <= 1.0 for f in schedule):
            raise ValueError(f"every fraction must be in (0, 1]; got {list(schedule)}")
        if any(b <= a for a, b in itertools.pairwise(schedule)):
            raise ValueError(f"schedule must be strictly increasing; got {list(schedule)}")
        if not math.isclose(schedule[-1], 1.0):
            raise ValueError(
                f"schedule must end at 1.0 so every weight is fixed; got {schedule[-1]}"
            )
        return schedule


class EvalConfig(_Section):
    """Evaluation settings.

    Args:
        mc_samples: Forward passes with weight sampling on, averaged, for the final model's
            sampled calibration metrics (0 skips them).
    """

    mc_samples: NonNegativeInt = 8


class ExperimentConfig(_Section):
    """Everything one pwf experiment depends on.

    Args:
        name: Experiment name (the MLflow experiment is named after it).
        seed: Seed for data splits, initialisation, sampling and shuffling.
        device: ``auto`` picks CUDA when present, else CPU; or an explicit torch device string.
    """

    name: str = "pwf-default"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: RoundTrainConfig = RoundTrainConfig()
    fixing: SerializeAsAny[FixingConfig] = Field(default_factory=lambda: _fixing_from({}))
    eval: EvalConfig = EvalConfig()

    @field_validator("device")
    @classmethod
    def _valid_device(cls, device: str) -> str:
        import torch

        if device == "auto":
            return device
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"'{device}' is not a torch device: {err}") from None
        return device

    @field_validator("fixing", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> FixingConfig:
        if isinstance(value, FixingConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError("fixing must be a mapping")
        return _fixing_from(value)

    def resolved_device(self) -> str:
        """The torch device this config runs on (``auto`` resolved)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def _fixing_from(values: Mapping[str, Any]) -> FixingConfig:
    # Imported here because the method modules import this one for FixingConfig.
    from pwf_core.methods import method_config_class

    return method_config_class(values.get("method", "pwfn")).model_validate(dict(values))


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field or '<config>'}: {message}")
    return "invalid experiment config:\n" + "\n".join(lines)


def parse_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping into an :class:`ExperimentConfig`.

    Raises:
        ConfigError: naming every offending field.
    """
    try:
        return ExperimentConfig.model_validate(dict(values))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``values`` with dotted-key overrides (``fixing.reg: 0.001``) applied."""
    merged: dict[str, Any] = json.loads(json.dumps(dict(values), default=str))
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"invalid override '{dotted}': '{part}' is not a section")
            node = child
        node[leaf] = value
    return merged


def parse_override_strings(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (values as YAML scalars) into a dotted-key mapping."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        parsed[key.strip()] = yaml.safe_load(text)
    return parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``, with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return values


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Load and validate an experiment config.

    Args:
        path: YAML file; ``None`` gives the built-in defaults (digits + small CNN + PWFN).
        overrides: Dotted keys to replace, e.g. ``{"fixing.reg": 0.001}``.

    Raises:
        ConfigError: for a missing file, bad YAML or any invalid field.
    """
    values = read_yaml(path) if path is not None else {}
    if overrides:
        values = apply_overrides(values, overrides)
    return parse_config(values)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The config as plain JSON-compatible data (paths as strings, tuples as lists)."""
    return json.loads(config.model_dump_json())


def flatten_config(config: BaseModel) -> dict[str, Any]:
    """Dotted-key view of the config, e.g. ``{"fixing.reg": 0.00048828125, ...}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config_to_dict(config))
    return flat


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections and other JSON-able values (cache keys)."""
    canonical = json.dumps(
        [config_to_dict(p) if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the config as YAML that :func:`load_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
