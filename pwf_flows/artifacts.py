"""Where an experiment's files live.

Layout under the artifacts directory::

    pretrained/<pretrain key>/model.safetensors       cached pretraining (shared by experiments)
    experiments/<name>/<run key>/
        config.yaml                                    the validated config
        mlflow_run_id                                  the MLflow run this experiment logs into
        init.safetensors                               converted model before the first step
        step_01.safetensors ... step_NN.safetensors    state after each step (PWFN: each round)
        final/                                         tables, plots, compressed model, summary

Every file is written atomically (see :mod:`pwf_core.checkpoint` for what a checkpoint holds).
On a cluster the artifacts folder is a shared mount, so a trial on any worker finds the
pretraining cache and the checkpoints of an interrupted trial.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pwf_core
from pwf_core._files import is_complete_safetensors
from pwf_core.config import ExperimentConfig, config_hash


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

    def step(self, index: int) -> Path:
        """Checkpoint after step ``index`` (0-based; the file is numbered from 1)."""
        return self.root / f"step_{index + 1:02d}.safetensors"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def summary(self) -> Path:
        return self.final / "summary.json"

    def finished_steps(self, num_steps: int, warn: Callable[[str], None] | None = None) -> int:
        """How many leading steps have a whole checkpoint (a resumed run starts after them).

        A checkpoint that is not whole (a disk that filled up, a copy cut short) is moved
        aside as ``*.corrupt``, with ``warn`` told, and the run resumes before it.
        """
        done = 0
        while done < num_steps and self.step(done).is_file():
            path = self.step(done)
            if not is_complete_safetensors(path):
                path.replace(path.with_name(path.name + ".corrupt"))
                if warn is not None:
                    where = f"step {done}" if done else "the start"
                    warn(
                        f"checkpoint {path.name} is incomplete; moved aside, resuming after {where}"
                    )
                break
            done += 1
        return done

    def clear(self) -> None:
        """Remove this experiment's files (its MLflow run is left as it is)."""
        shutil.rmtree(self.root, ignore_errors=True)
