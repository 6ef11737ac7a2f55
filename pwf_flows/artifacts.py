"""Where an experiment's files live, and how a round checkpoint is written and read.

Layout under the artifacts directory::

    pretrained/<pretrain key>/model.safetensors       cached pretraining (shared by experiments)
    experiments/<name>/<run key>/
        config.yaml                                    the validated config
        mlflow_run_id                                  the MLflow run this experiment logs into
        init.safetensors                               converted model after variance init
        round_00.safetensors ... round_NN.safetensors  state after each fixing round
        final/                                         tables, plot, compressed model, summary

Every file is written atomically. A round checkpoint holds the whole model state (means,
sigmas, fixed masks, norms) and the method's state; its header holds the round's metrics and
per-centre summary. Each round reseeds from the experiment seed and builds a fresh optimiser,
so this is all a resumed run needs to continue exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

import pwf_core
from pwf_core.checkpoint import load_tensors, read_metadata, save_tensors
from pwf_core.config import ExperimentConfig, config_hash
from pwf_core.methods import FixingMethod

_METHOD_PREFIX = "method."


@cache
def code_version() -> str:
    """Hash of the pwf_core sources: a code change invalidates caches and starts new runs."""
    digest = hashlib.sha256()
    root = Path(pwf_core.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def pretrain_key(config: ExperimentConfig) -> str:
    """What determines pretraining: model, data, pretrain settings, seed and code."""
    return config_hash(config.model, config.data, config.pretrain, config.seed, code_version())


def run_key(config: ExperimentConfig) -> str:
    """What determines a whole experiment: the full config and the code."""
    return config_hash(config, code_version())


@dataclass(frozen=True)
class ExperimentFiles:
    """Paths of one experiment's files."""

    root: Path
    pretrained_model: Path

    @classmethod
    def for_config(cls, config: ExperimentConfig, artifacts_dir: str | Path) -> ExperimentFiles:
        base = Path(artifacts_dir).resolve()
        return cls(
            root=base / "experiments" / config.name / run_key(config),
            pretrained_model=base / "pretrained" / pretrain_key(config) / "model.safetensors",
        )

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def mlflow_run_id(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def init(self) -> Path:
        return self.root / "init.safetensors"

    def round(self, index: int) -> Path:
        return self.root / f"round_{index:02d}.safetensors"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def summary(self) -> Path:
        return self.final / "summary.json"

    def finished_rounds(self, num_rounds: int) -> int:
        """How many leading rounds have a checkpoint (a resumed run starts after them)."""
        done = 0
        while done < num_rounds and self.round(done).is_file():
            done += 1
        return done


def save_model_checkpoint(
    path: Path,
    model: nn.Module,
    method: FixingMethod | None = None,
    header: dict[str, Any] | None = None,
) -> Path:
    """Model state (+ method state) as safetensors, with a JSON header."""
    tensors = dict(model.state_dict())
    if method is not None:
        tensors.update({_METHOD_PREFIX + k: v for k, v in method.state_dict().items()})
    return save_tensors(path, tensors, {"pwf": json.dumps(header or {})})


def load_model_checkpoint(
    path: Path, model: nn.Module, method: FixingMethod | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_model_checkpoint`; returns its header.

    Raises:
        CheckpointError: naming the path when it is missing or unreadable.
    """
    tensors = load_tensors(path)
    state = {k: v for k, v in tensors.items() if not k.startswith(_METHOD_PREFIX)}
    model.load_state_dict(state)
    if method is not None:
        prefix = len(_METHOD_PREFIX)
        method.load_state_dict(
            {k[prefix:]: v for k, v in tensors.items() if k.startswith(_METHOD_PREFIX)}
        )
    return read_header(path)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a checkpoint (metrics, summary) without loading its tensors."""
    return json.loads(read_metadata(path).get("pwf", "{}"))


def round_header(round_index: int, fraction: float, metrics: dict, summary: pd.DataFrame):
    """The header stored with a round checkpoint."""
    return {
        "round": round_index,
        "fraction": fraction,
        "metrics": metrics,
        "summary": json.loads(summary.to_json(orient="records")),
    }
