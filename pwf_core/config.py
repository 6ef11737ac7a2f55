"""The one typed experiment config, validated at the edge.

Everything a run depends on lives in :class:`ExperimentConfig`: its hash keys caches, its
flattened form is what trackers record as parameters, and sweeps name its dotted fields.
Bad values fail with :class:`ConfigError`, whose message names each offending field.

The method's knobs live in the ``compression`` section, validated by the config class that the
section's ``method`` names (see :mod:`pwf_core.registry`). ``fixing`` is its old name and is
still read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
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

from pwf_core.registry import MethodConfig, as_method_config, config_class

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]

SECTION = "compression"
DEFAULT_METHOD = "pwfn"
LEGACY_SECTION = "fixing"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending field."""


def check_name(name: str, what: str = "name") -> str:
    """A name that is safe as one path component: letters, digits, ``.``, ``_``, ``-``.

    Experiment and sweep names become folder names and MLflow experiment names, and a
    deployment takes them from any API caller, so ``../x``, ``/abs`` or very long names are
    refused here rather than written outside the artifacts folder.
    """
    if not name:
        raise ValueError(f"{what} is empty")
    if len(name) > NAME_MAX:
        raise ValueError(f"{what} is {len(name)} characters long; at most {NAME_MAX}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} '{name}' may only hold letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Which network to compress.

    Args:
        name: One of pwf's models (``small_cnn``, ``mnist_cnn``, ``cifar_resnet18``) or any timm
            architecture name.
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
        from pwf_core.models import is_known_model, pwf_model_names, similar_model_names

        if not is_known_model(name):
            hint = similar_model_names(name)
            suffix = f"; did you mean one of {hint}?" if hint else ""
            own = ", ".join(pwf_model_names())
            raise ValueError(f"unknown model '{name}' (not one of pwf's {own}, not timm's){suffix}")
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
    """Optimiser settings shared by pretraining and the training between fixing rounds.

    Args:
        sigma_lr: Learning rate of the sigmas of converted weights (default: ``lr``).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 1e-3
    sigma_lr: PositiveFloat | None = None
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: NonNegativeFloat = 1e-4
    grad_clip: PositiveFloat | None = 1.0
    batch_size: PositiveInt = 64


class PretrainConfig(OptimConfig):
    """Deterministic training before conversion. ``epochs: 0`` uses the weights as given."""

    epochs: NonNegativeFloat = 20.0
    lr: PositiveFloat = 0.05
    cosine: bool = True


class TrainConfig(OptimConfig):
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


class EvalConfig(_Section):
    """Evaluation settings.

    Args:
        mc_samples: Forward passes with weight sampling on, averaged, for the final model's
            sampled calibration metrics (0 skips them).
    """

    mc_samples: NonNegativeInt = 8


class ExecutionConfig(_Section):
    """How a run is carried out. Nothing here changes a result, so it is not part of the
    experiment's key: a run continued with other execution settings is the same experiment.

    Args:
        keep_checkpoints: Keep every step's checkpoint. By default only the last finished
            step's is kept (all a resume needs); each new one is written whole before the
            previous one is removed.
        infra_timeout_s: How long an outage of the tracking server, the study database or the
            Prefect API is waited out (retried with backoff) before the run stops; the same
            command then continues it.
    """

    keep_checkpoints: bool = False
    infra_timeout_s: PositiveFloat = 600.0


class ExperimentConfig(_Section):
    """Everything one pwf experiment depends on.

    Args:
        name: Experiment name: the MLflow experiment and the artifacts folder are named after
            it (letters, digits, ``.``, ``_``, ``-``; at most 100 characters).
        seed: Seed for data splits, initialisation, sampling and shuffling.
        device: ``auto`` picks CUDA when present, else CPU; or an explicit torch device string.
        compression: The method and its knobs, e.g. ``{method: pwfn, b: 5}``.
    """

    name: str = "pwf-default"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    compression: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: config_class(DEFAULT_METHOD)()
    )
    eval: EvalConfig = EvalConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name)

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

    @field_validator("compression", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> MethodConfig:
        if isinstance(value, Mapping) and "method" not in value:
            value = {"method": DEFAULT_METHOD, **value}
        return as_method_config(value)

    def resolved_device(self) -> str:
        """The torch device this config runs on (``auto`` resolved)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def _format_errors(err: ValidationError, title: str = "invalid experiment config") -> str:
    lines = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {field or '<config>'}: {message}")
    return f"{title}:\n" + "\n".join(lines)


def _current_section_name(values: Mapping[str, Any]) -> str:
    if LEGACY_SECTION in values and SECTION in values:
        raise ConfigError(
            f"the config has both '{SECTION}' and '{LEGACY_SECTION}' sections; "
            f"'{LEGACY_SECTION}' is the old name of '{SECTION}': keep one"
        )
    return LEGACY_SECTION if LEGACY_SECTION in values else SECTION


def _renamed_legacy(values: Mapping[str, Any]) -> dict[str, Any]:
    """``fixing:`` (the section's old name) read as ``compression:``."""
    values = dict(values)
    if _current_section_name(values) == LEGACY_SECTION:
        values[SECTION] = values.pop(LEGACY_SECTION)
    return values


def parse_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping into an :class:`ExperimentConfig`.

    Raises:
        ConfigError: naming every offending field.
    """
    try:
        return ExperimentConfig.model_validate(_renamed_legacy(values))
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key]``; a mapping merges into an existing section instead of replacing it."""
    current = node.get(key)
    if isinstance(value, Mapping) and isinstance(current, dict):
        for child_key, child_value in value.items():
            _merge(current, str(child_key), child_value)
    else:
        node[key] = copy.deepcopy(value)


def _asked_method(parts: list[str], value: Any) -> Any:
    """The method an override asks for, if it names one."""
    if parts == [SECTION, "method"]:
        return value
    if parts == [SECTION] and isinstance(value, Mapping):
        return value.get("method")
    return None


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``values`` with dotted-key overrides (``compression.reg: 0.001``) applied.

    A mapping value merges into the section it names (``pretrain: {epochs: 1}`` changes only
    ``pretrain.epochs``). A different ``compression.method`` resets the section to that
    method's defaults first: the old method's knobs (and its schedule) are not the new one's.

    Raises:
        ConfigError: when a dotted key runs through a value that is not a section.
    """
    merged = _renamed_legacy(json.loads(json.dumps(dict(values), default=str)))
    named = [(dotted.split("."), value) for dotted, value in overrides.items()]
    for parts, _ in named:
        if parts[0] == LEGACY_SECTION:
            parts[0] = SECTION
    # Method switches first, so that knobs given beside one apply to the new method.
    named.sort(key=lambda item: _asked_method(*item) is None)
    for parts, value in named:
        asked = _asked_method(parts, value)
        section = merged.get(SECTION)
        current = section.get("method", DEFAULT_METHOD) if isinstance(section, dict) else None
        if asked is not None and asked != current:
            merged[SECTION] = {"method": asked}
        node = merged
        *parents, leaf = parts
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(parts)
                raise ConfigError(f"invalid override '{dotted}': '{part}' is not a section")
            node = child
        _merge(node, leaf, value)
    return merged


def _finite(value: Any, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"override '{key}': {value} is not a finite number")
    if isinstance(value, Mapping):
        for child in value.values():
            _finite(child, key)
    if isinstance(value, list):
        for child in value:
            _finite(child, key)
    return value


def parse_override_strings(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings (values as YAML) into a dotted-key mapping.

    Raises:
        ConfigError: for an item without ``=``, a value that is not YAML, or NaN/infinity.
    """
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.field=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({problem})"
            ) from None
        parsed[key] = _finite(value, key)
    return parsed


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping from ``path``, with a clear error when it is missing or malformed.

    Raises:
        ConfigError: for a missing, unreadable, non-UTF-8, empty or malformed file, or one
            that does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} '{path}': {err.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None
    if values is None:
        raise ConfigError(f"{what} '{path}' is empty")
    if not isinstance(values, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping at the top level")
    return values


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Load and validate an experiment config.

    Args:
        path: YAML file; ``None`` gives the built-in defaults (digits + small CNN + PWFN).
        overrides: Dotted keys to replace, e.g. ``{"compression.reg": 0.001}``.

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
