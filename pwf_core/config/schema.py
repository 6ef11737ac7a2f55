"""The experiment config: composed from the sections the library's pieces define.

Everything a run depends on lives in :class:`ExperimentConfig`: its hash keys caches, its
flattened form is what trackers record as parameters, and sweeps name its dotted fields. Each
section is defined beside what uses it (the model beside the models, the training settings
beside the training loop, a method's knobs in its package); this module only puts them together
and adds the two that belong to a whole run, :class:`EvalConfig` and :class:`ExecutionConfig`.
Nothing below it imports it.

The method's knobs live in the ``compression`` section, validated by the config class that the
section's ``method`` names (see :mod:`pwf_core.registry`). ``fixing`` is its old name and is
still read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator

from pwf_core._seeding import derive_seed
from pwf_core.data import DataConfig
from pwf_core.errors import ConfigError
from pwf_core.models import ModelConfig
from pwf_core.registry import MethodConfig, as_method_config, config_class, default_method_name
from pwf_core.train import PretrainConfig, TrainConfig
from pwf_core.types import NonNegativeInt, PositiveFloat, Section, check_name

SECTION = "compression"
LEGACY_SECTION = "fixing"


class EvalConfig(Section):
    """Evaluation settings.

    Args:
        mc_samples: Forward passes with weight sampling on, averaged, for the sampled metrics
            of a final model that still samples its weights (0 skips them; a method's own
            setting, like 2DGBNN's ``eval_samples``, takes its place). A model whose every
            weight is fixed is deterministic and reports no sampled metrics.
    """

    mc_samples: NonNegativeInt = 8


class ExecutionConfig(Section):
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


class ReplicateConfig(Section):
    """Which replicate of an experiment a run is, and what a replicate varies.

    Replicates are the same experiment under other seeds, to tell a real difference from
    seed noise. The default follows the papers' design: one pretrained model per base seed,
    shared by every replicate and every method, and the compression stage's randomness
    (sigma initialisation where random, weight sampling, batch order, k-means' fit sample)
    varied, so methods are compared paired on the same pretrained weights.

    Args:
        index: 0 is the experiment itself; replicate ``r > 0`` reseeds from ``(seed, r)``.
        reseeds: ``compression`` (the default) or ``all``, which also reseeds the model's
            initialisation and pretraining (each replicate pretrains its own model).
    """

    index: NonNegativeInt = 0
    reseeds: Literal["compression", "all"] = "compression"


class ExperimentConfig(Section):
    """Everything one pwf experiment depends on.

    Args:
        name: Experiment name: the MLflow experiment and the artifacts folder are named after
            it (letters, digits, ``.``, ``_``, ``-``; at most 100 characters).
        seed: Seed for initialisation, sampling and shuffling (data splits are fixed, so
            every seed is tested on the same images).
        device: ``auto`` picks CUDA when present, else CPU; or an explicit torch device string.
        compression: The method and its knobs, e.g. ``{method: pwfn, b: 5}``.
        replicate: Which replicate of the experiment this run is (see
            :class:`ReplicateConfig`).
    """

    name: str = "pwf-default"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    compression: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: config_class(default_method_name())()
    )
    eval: EvalConfig = EvalConfig()
    replicate: ReplicateConfig = ReplicateConfig()
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
            value = {"method": default_method_name(), **value}
        return as_method_config(value)

    @property
    def compression_seed(self) -> int:
        """The seed of the compression stage: the experiment seed, or a replicate's own."""
        if self.replicate.index == 0:
            return self.seed
        return derive_seed(self.seed, "replicate", self.replicate.index)

    @property
    def pretrain_seed(self) -> int:
        """The seed of the model's initialisation and pretraining: shared by the replicates,
        unless they reseed everything."""
        return self.seed if self.replicate.reseeds == "compression" else self.compression_seed

    def resolved_device(self) -> str:
        """The torch device this config runs on (``auto`` resolved)."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def format_errors(err: ValidationError, title: str = "invalid experiment config") -> str:
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


def renamed_legacy(values: Mapping[str, Any]) -> dict[str, Any]:
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
        return ExperimentConfig.model_validate(renamed_legacy(values))
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None
