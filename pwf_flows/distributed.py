"""One experiment on N processes: ``pwf run --nproc N`` (or ``torchrun -m pwf_flows.cli run``).

Rank 0 runs the ``pwf-experiment`` flow as usual (Prefect tasks, MLflow, checkpoints); the other
ranks run no flow. Before each piece of work with collectives rank 0 tells them what comes
(:func:`lead`) and they do the same in lockstep (:func:`follow`):

- ``pretrain``: DDP pretraining (when it is not cached);
- ``sync``: receive rank 0's converted model and method state (after conversion, or a
  restore from a checkpoint);
- ``step i``: run step ``i`` of the method (DDP training; rank 0 fixes and broadcasts);
- ``done``: leave.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import torch.distributed as dist

from pwf_core.bayes import to_bayesian
from pwf_core.config import ExperimentConfig
from pwf_core.distributed import broadcast_run_state, is_distributed, is_main


def lead(command: str, *args: Any) -> None:
    """Rank 0: announce the next piece of work to the other ranks (no-op on one process)."""
    if is_distributed() and is_main():
        dist.broadcast_object_list([(command, args)], src=0)


def share_state(run) -> None:
    """Rank 0: send the run's model and method state to the other ranks."""
    if is_distributed():
        lead("sync")
        broadcast_run_state(run.model, run.method)


def follow(config: ExperimentConfig) -> None:
    """Ranks > 0: do what rank 0 announces until it says ``done``."""
    from pwf_core.api import Compression
    from pwf_core.data import load_dataset
    from pwf_core.pretrain import build_experiment_model, pretrain

    dataset = load_dataset(config.data)
    run = None
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        command, args = message[0]
        if command == "done":
            return
        if command == "pretrain":
            model = build_experiment_model(config, dataset)
            pretrain(model, dataset, config, config.resolved_device(), progress=False)
        elif command == "sync":
            if run is None:
                run = Compression.from_config(config, dataset, progress=False)
                to_bayesian(run.model, attrs=run.method.converted)
                run.method.attach(run.model)
            broadcast_run_state(run.model, run.method)
        elif command == "step":
            run.run_step(args[0])


RELAUNCH_GRACE_S = 10.0  # how long an interrupted relaunch waits before it passes SIGTERM on


def relaunch(argv: list[str], nproc: int) -> int:
    """Run this ``pwf`` command again on ``nproc`` processes under ``torch.distributed.run``.

    Interrupted (Ctrl-C, or a SIGTERM that pwf's handler raises as one), it waits for torchrun:
    a signal to the terminal's process group or to every process of a batch job reached
    torchrun too, which passes SIGTERM on to each rank (rank 0 then marks the MLflow run
    KILLED). Only a torchrun still running after :data:`RELAUNCH_GRACE_S` is sent SIGTERM, so
    it is never signalled twice (``subprocess.call`` would SIGKILL it and leave the ranks).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "pwf_flows.cli",
        *argv,
    ]
    with subprocess.Popen(command) as process:
        try:
            return process.wait()
        except KeyboardInterrupt:
            try:
                process.wait(timeout=RELAUNCH_GRACE_S)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGTERM)
                process.wait()
            raise
