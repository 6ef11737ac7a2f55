"""A real single-node Slurm cluster for tests: the distribution's munged, slurmctld and slurmd
on 127.0.0.1, with their own key, config, sockets, ports, logs and state in one folder.

Nothing outside the folder is used (no /etc/slurm, no /run/munge), so two of them can run on
one machine at once. The node has two GPUs as Slurm sees them (``gres/gpu`` backed by
``/dev/null`` and ``/dev/zero``): Slurm hands a job ``CUDA_VISIBLE_DEVICES`` as it would on a
GPU node, and a job that asks for more GPUs than are free waits. Slurm's own tools
(``sbatch``, ``squeue``, ``scancel``, ``scontrol``) find this cluster through ``SLURM_CONF`` in
the environment of the :class:`~tests._dummies.services.Services` they run from.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from tests._dummies.services import Services, free_port, wait_until

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
NODE = "pwfnode"
GPU_DEVICES = ("/dev/null", "/dev/zero")  # stand-ins Slurm can stat as character devices
KILL_WAIT_S = 10  # Slurm's grace between SIGTERM and SIGKILL when it ends a job


def missing_tools() -> list[str]:
    """Slurm and munge programs not on this machine (``make test`` installs them)."""
    return [name for name in PROGRAMS if shutil.which(name) is None]


class SlurmCluster:
    """munged, slurmctld and slurmd for one folder, started as services of ``services``.

    Args:
        services: Where the daemons run (and are stopped with :meth:`Services.stop_all`);
            ``SLURM_CONF`` is added to its environment, so every process it starts, and every
            job those submit, talks to this cluster.
        folder: Holds the key, configs, sockets, logs, state and spool.
        cpus: CPUs the node offers (Slurm is told to believe it, whatever the machine has).
    """

    def __init__(self, services: Services, folder: Path, cpus: int = 4) -> None:
        self.services, self.folder, self.cpus = services, folder, cpus
        self.conf = folder / "slurm.conf"
        self.submitted: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        """Write the configs, start the daemons and wait until the node takes jobs."""
        for sub in ("state", "spool", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._write_configs()
        self.services.env.update(self.env)
        munge = self.folder / "munge"
        self.services.start(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        wait_until(lambda: (munge / "munge.socket").exists(), "munged's socket", timeout=30)
        self.services.start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self.services.start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        self.services.wait_for(self._node_idle, "the Slurm node to take jobs", timeout=60)

    def _write_configs(self) -> None:
        host = socket.gethostname()
        folder = self.folder
        lines = [
            "ClusterName=pwftest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again
            # (120 s by default; a job started sooner is killed, its credential revoked).
            f"AuthInfo=cred_expire=10,socket={folder / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            # No cgroups: processes are tracked by their parents, tasks are not bound.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            # Look at pending jobs every few seconds (60 and 30 s by default): a requeued job
            # becomes eligible by time, not by an event that would wake the scheduler.
            "SchedulerParameters=sched_interval=3,bf_interval=3",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",  # the node has the CPUs this file says
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            f"KillWait={KILL_WAIT_S}",
            "GresTypes=gpu",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
            f"RealMemory=4000 Gres=gpu:{len(GPU_DEVICES)} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        gres = [f"NodeName={NODE} Name=gpu File={device}" for device in GPU_DEVICES]
        (folder / "gres.conf").write_text("\n".join(gres) + "\n")

    def _node_idle(self) -> bool:
        try:
            state = self.services.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=20)
        except (AssertionError, subprocess.TimeoutExpired):
            return False
        return state.strip() == "idle"

    def sbatch(self, *argv: str, cwd: Path | None = None, **env: str) -> str:
        """Submit a batch job (``sbatch --parsable``); its job id.

        Args:
            *argv: Options and the script, as on the command line.
            cwd: Where sbatch runs (the job's working directory and log folder).
            **env: Variables for sbatch, and so for the job.
        """
        output = self.services.run(["sbatch", "--parsable", *argv], cwd=cwd, **env)
        job = output.strip().splitlines()[-1].split(";")[0]
        self.submitted.append(job)
        return job

    def jobs(self) -> dict[str, str]:
        """The jobs Slurm still lists (array tasks as ``JOB_TASK``) and their states."""
        output = self.services.run(["squeue", "-h", "-r", "-o", "%i %T"], timeout=30)
        return dict(line.split() for line in output.splitlines() if line.strip())

    def scancel(self, job: str, *options: str) -> None:
        """``scancel [options] job``. Its exit code is not read: Slurm 22.05's answers to a
        signal for one task of an array include "Job can not be altered now" (exit code 1)
        although the signal was delivered; the tests check what the signal did instead."""
        subprocess.run(
            ["scancel", *options, job], env=self.services.env, capture_output=True, timeout=30
        )

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping (Slurm keeps a finished job a few minutes)."""
        output = self.services.run(["scontrol", "-o", "show", "job", job], timeout=30)
        info: dict[str, str] = {}
        for word in output.split():
            key, _, value = word.partition("=")
            info.setdefault(key, value)
        return info

    def cancel_all(self) -> None:
        """Cancel every job submitted here and wait (a bounded time) until none is left."""
        if self.submitted:
            self.services.run(["scancel", *self.submitted], timeout=30)
        deadline = time.monotonic() + KILL_WAIT_S + 20
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every process whose environment names this cluster's config: after the
        jobs were cancelled and the services stopped, none should be left (a job step's
        slurmstepd, a process a job started in a session of its own). Their ids."""
        killed = []
        for process in psutil.process_iter():
            if process.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if process.environ().get("SLURM_CONF") == str(self.conf):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
        return killed


@contextlib.contextmanager
def slurm_cluster(services: Services, folder: Path, cpus: int = 4):
    """A started :class:`SlurmCluster`; at the end, even when the block fails, its jobs are
    cancelled, ``services`` (the daemons among them) stopped, and whatever is left killed."""
    cluster = SlurmCluster(services, folder, cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
        services.stop_all()
        cluster.kill_leftovers()
