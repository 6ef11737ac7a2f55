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
from typing import Any

import pwf_core
from pwf_core._files import is_complete_safetensors, is_sound_safetensors
from pwf_core.checkpoint import CheckpointSize
from pwf_core.config import ExperimentConfig, config_hash, config_to_dict
from pwf_core.registry import create_method


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
    """What determines pretraining: model, data, pretrain settings, its seed and code (so the
    replicates of an experiment, and every method on the same base, share one)."""
    return config_hash(
        config.model, config.data, config.pretrain, config.pretrain_seed, code_version()
    )


def experiment_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The config as it determines the experiment's results: all but how it is executed
    (keeping checkpoints, timeouts), so a rerun under other execution settings is the same."""
    return {k: v for k, v in config_to_dict(config).items() if k != "execution"}


def run_key(config: ExperimentConfig) -> str:
    """What determines a whole experiment: its settings and the code."""
    return config_hash(experiment_settings(config), code_version())


def set_aside(path: Path) -> Path:
    """Move a damaged file out of the way as ``<name>.corrupt`` (kept for a post-mortem)."""
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    return aside


def usable_checkpoint(path: Path, warn: Callable[[str], None] | None = None) -> bool:
    """Whether the checkpoint at ``path`` can be resumed from; a damaged one is set aside."""
    if not path.exists():
        return False
    if is_sound_safetensors(path):
        return True
    set_aside(path)
    if warn is not None:
        warn(f"{path} is damaged or incomplete; moved aside as {path.name}.corrupt")
    return False


def setting_key(config: ExperimentConfig) -> str:
    """What every replicate of an experiment shares: its run key with the replicate left out
    (the report groups replicates by it; its ``seed`` and replicate index pair them)."""
    return run_key(config.model_copy(update={"replicate": type(config.replicate)()}))


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

    @property
    def early_stopped(self) -> Path:
        """Where a sweep trial stopped early by its rule says so (no final/ follows)."""
        return self.root / "early_stopped.json"

    @property
    def lock_folder(self) -> Path:
        """Where the one-process-per-experiment lock lives (see :mod:`pwf_flows.run_lock`)."""
        return self.root

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step number, path)`` of every step checkpoint on disk, in step order."""
        found = []
        for path in self.root.glob("step_*.safetensors"):
            number = path.name.removeprefix("step_").removesuffix(".safetensors")
            if number.isdigit():
                found.append((int(number), path))
        return sorted(found)

    def finished_steps(self, num_steps: int, warn: Callable[[str], None] | None = None) -> int:
        """How many steps are done: the number of the newest sound step checkpoint.

        A checkpoint that is not whole (a disk that filled up, a copy cut short) or whose bytes
        changed (its checksum) is moved aside as ``*.corrupt``, with ``warn`` told, and the run
        resumes from the one before it, or from the start when it was the only one kept (every
        step reseeds from the seed, so the steps done again give the same numbers).
        """
        for number, path in reversed(self.checkpoints()):
            if number > num_steps:
                continue
            if is_sound_safetensors(path):
                return number
            set_aside(path)
            if warn is not None:
                warn(
                    f"checkpoint {path.name} is damaged or incomplete; moved aside as "
                    f"{path.name}.corrupt, resuming before it"
                )
        return 0

    def resume_point(self, finished: int) -> Path:
        """The checkpoint a run with ``finished`` steps done continues from."""
        return self.step(finished - 1) if finished else self.init

    def prune(self, finished: int) -> None:
        """Remove the checkpoints a run with ``finished`` steps done no longer needs: every
        step before the last one, and the converted model before the first step."""
        if finished == 0:
            return
        self.init.unlink(missing_ok=True)
        for number, path in self.checkpoints():
            if number < finished:
                path.unlink(missing_ok=True)

    def remove_checkpoints(self) -> None:
        """Remove every checkpoint (a run nobody will resume: stopped early)."""
        self.init.unlink(missing_ok=True)
        for _, path in self.checkpoints():
            path.unlink(missing_ok=True)

    def clear_outputs(self) -> None:
        """Remove this experiment's files but its lock (its MLflow run is left as it is)."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name in ("run.lock", "run.owner", "prefect_run.json"):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DiskPlan:
    """What a run will put on the artifacts disk, against what is free there.

    Args:
        folder: The artifacts folder (or its nearest existing parent).
        needed: Bytes the run may hold at its peak.
        free: Bytes free on that disk now.
        detail: How ``needed`` adds up, for a person.
    """

    folder: Path
    needed: int
    free: int
    detail: str

    @property
    def fits(self) -> bool:
        return self.needed <= self.free


def _existing(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder


def human_bytes(count: float) -> str:
    """``1.2 GB``, ``340 MB``, ``56 kB``: decimal units, as ``df -H`` shows them."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


DISK_MARGIN = 2 * 2**20  # tables, plots, the config and the lock: small, but not nothing


def disk_plan(
    config: ExperimentConfig, size: CheckpointSize, artifacts_dir: str | Path, runs: int = 1
) -> DiskPlan:
    """The disk ``runs`` experiments like ``config`` need under ``artifacts_dir``.

    Each keeps its newest checkpoint, and holds two for a moment (the new one is whole before
    the old one goes), or every step's with ``execution.keep_checkpoints``; plus its compressed
    model (at most the float model's size) and, unless cached, the pretrained model.
    """
    files = ExperimentFiles.for_config(config, artifacts_dir)
    steps = len(create_method(config.compression).plan())
    copies = steps + 1 if config.execution.keep_checkpoints else 2
    pretrained = 0 if is_complete_safetensors(files.pretrained_model) else size.plain_bytes
    per_run = copies * size.checkpoint_bytes + size.plain_bytes + DISK_MARGIN
    needed = pretrained + runs * per_run
    folder = _existing(Path(artifacts_dir).resolve())
    checkpoint = human_bytes(size.checkpoint_bytes)
    if config.execution.keep_checkpoints:
        kept = f"every step's checkpoint ({copies} of {checkpoint})"
    else:
        kept = f"the newest checkpoint ({checkpoint}; two while the next one is written)"
    detail = f"{kept}, the compressed model{' and the pretrained one' if pretrained else ''}" + (
        f"; for {runs} runs" if runs > 1 else ""
    )
    return DiskPlan(folder, needed, shutil.disk_usage(folder).free, detail)
