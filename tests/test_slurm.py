"""pwf's work pools on a real Slurm cluster: the distribution's slurmctld, slurmd and munged on
127.0.0.1 (one node with two GPUs as Slurm sees them), a Prefect server and an MLflow server;
the sweep drivers and the trials run in Slurm jobs submitted with ``sbatch`` from the shipped
scripts in ``slurm/``, and a worker job is cancelled with ``scancel`` in the middle of a trial.

Everything started here (daemons, servers, jobs and what they started) is stopped at the end
of the module, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pwf_flows.sweep.pool import FLOW_RUNS_ATTR
from tests._dummies.services import (
    Services,
    flow_run_id,
    free_port,
    mlflow_server_argv,
    prefect_server_argv,
    wait_until,
)
from tests._dummies.slurm import KILL_WAIT_S, SlurmCluster, missing_tools, slurm_cluster
from tests.conftest import ROOT

# A sweep through sbatch jobs on two busy cores can take minutes; a hang is still caught.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]

SLURM = ROOT / "slurm"
IDLE_EXIT_S = 15  # the workers' --idle-exit here (300 s by default)
# What the test node has room for; the command line overrides the scripts' #SBATCH lines.
RESOURCES = ("--cpus-per-task=1", "--mem=200M", "--time=15")
TINY = {"pretrain.epochs": 2, "train.epochs": 0.1, "eval.mc_samples": 0}
# A trial long enough to be stopped in the middle twice: five rounds of ten epochs.
SLOW = {"compression.schedule": [0.2, 0.4, 0.6, 0.8, 1.0], "train.epochs": 10.0}


def sweep_file(folder: Path, name: str, n_trials: int, **experiment) -> Path:
    """A sweep of the default experiment over b alone, on a tiny base (or ``experiment``)."""
    values = {
        "name": name,
        "base": str(ROOT / "configs" / "default.yaml"),
        "overrides": {**TINY, "compression.schedule": [0.5, 1.0], **experiment},
        "space": {"compression.b": {"int": [3, 6]}},
        "study": {
            "n_trials": n_trials,
            "storage": f"sqlite:///{folder / 'optuna.db'}",
            "heartbeat_s": 2,
            "sampler": "random",
        },
        "execution": {"max_parallel": 2, "artifacts_dir": str(folder / "artifacts")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@dataclass
class Stack:
    """The servers, the Slurm cluster, and the sweeps run through them."""

    services: Services
    cluster: SlurmCluster

    @property
    def workdir(self) -> Path:
        return self.services.workdir

    def submit(self, script: str, *options: str) -> str:
        """``sbatch [options] slurm/<script>`` from the work folder; the job id."""
        return self.cluster.sbatch(*RESOURCES, *options, str(SLURM / script), cwd=self.workdir)

    def sweep(self, name: str, n_trials: int, watch: bool, **experiment) -> str:
        """``prefect deployment run pwf/full-sweep`` with a sweep file of a tiny study
        ``name`` (:func:`sweep_file`); the command's output."""
        path = sweep_file(self.workdir, name, n_trials, **experiment)
        argv = ["prefect", "deployment", "run", "pwf/full-sweep", "--param", f"sweep={path}"]
        if watch:
            argv += ["--watch", "--watch-timeout", "600"]
        return self.services.run(argv, timeout=660)

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{self.workdir / 'optuna.db'}")

    def log(self, job: str) -> str:
        """A job's output file (``pwf-*-<job>.log`` in the work folder)."""
        job_id, _, task = job.partition("_")
        suffix = f"{job_id}_{task}" if task else job_id
        (path,) = self.workdir.glob(f"pwf-*-{suffix}.log")
        return path.read_text()

    def wait_for_queued_trials(self, name: str, count: int) -> None:
        """Wait until the driver of sweep ``name`` has submitted ``count`` trials to the pool
        (then worker jobs submitted find work at once, however slowly the driver started)."""

        def queued() -> bool:
            with contextlib.suppress(KeyError):  # no study yet
                running = self.study(name).get_trials(states=(TrialState.RUNNING,))
                return sum(FLOW_RUNS_ATTR in t.user_attrs for t in running) == count
            return False

        self.services.wait_for(queued, f"{count} trials of {name} on the pool", timeout=300)

    def wait_jobs_gone(self, jobs: list[str], timeout: float) -> None:
        """Wait until Slurm no longer lists any of ``jobs`` (their workers left)."""

        def gone() -> bool:
            listed = self.cluster.jobs()
            return not any(j == job or j.startswith(f"{job}_") for j in listed for job in jobs)

        self.services.wait_for(gone, lambda: f"jobs to end: {self.cluster.jobs()}", timeout)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_tools()
    assert not missing, f"{missing} not found: `make test` installs slurm-wlm and munge"
    assert os.geteuid() == 0, "slurmd runs jobs as their users: the Slurm tests need root"
    workdir = tmp_path_factory.mktemp("slurm")
    ports = {"prefect": free_port(), "mlflow": free_port()}
    services = Services(
        workdir,
        env={
            "PREFECT_HOME": str(workdir / ".prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # Read by the job scripts (sbatch passes its environment on to the jobs).
            "PWF_PROJECT_DIR": str(ROOT),
            "PWF_VENV": str(Path(sys.executable).parent.parent),
            "PWF_IDLE_EXIT_S": str(IDLE_EXIT_S),
            "OMP_NUM_THREADS": "1",
        },
    )
    with slurm_cluster(services, workdir / "slurm") as cluster:
        services.start("prefect-server", prefect_server_argv(ports["prefect"]))
        backend = f"sqlite:///{workdir / 'mlruns.db'}"
        services.start("mlflow-server", mlflow_server_argv(ports["mlflow"], backend))
        services.wait_http(f"{services.env['PREFECT_API_URL']}/health", "Prefect", timeout=240)
        services.wait_http(f"{services.env['MLFLOW_TRACKING_URI']}/health", "MLflow", timeout=240)
        for pool in ("gpu", "cpu"):
            services.run(["prefect", "work-pool", "create", pool, "--type", "process"])
        services.run(["prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT)
        yield Stack(services, cluster)


def mlflow_runs(stack: Stack, experiment: str) -> tuple[list, list]:
    """The sweep's parent run and its trials' runs."""
    client = MlflowClient(stack.services.env["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    return parents, [r for r in runs if r.data.tags.get("kind") != "sweep"]


def trial_flow_runs(stack: Stack, name: str) -> list[dict]:
    """Every flow run a driver submitted for the trials of sweep ``name``."""
    runs = stack.services.prefect_api("flow_runs/filter", {"limit": 200})
    return [
        r
        for r in runs
        if (r.get("parameters") or {}).get("config", {}).get("name") == name
        and (r.get("parameters") or {}).get("trial")
    ]


def test_a_sweep_runs_to_its_end_on_slurm_worker_jobs(slurm):
    drivers = slurm.submit("sweep-drivers.sbatch")
    driver = flow_run_id(slurm.sweep("on-slurm", n_trials=2, watch=False))
    slurm.wait_for_queued_trials("on-slurm", 2)
    workers = slurm.submit("gpu-workers.sbatch", "--array=0-1")
    assert slurm.services.wait_flow_runs({"driver": driver}, 600)["driver"]["type"] == "COMPLETED"

    study = slurm.study("on-slurm")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2 and not study.get_trials(states=(TrialState.FAIL,))
    parents, children = mlflow_runs(slurm, "on-slurm")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_id for c in children) == sorted(
        t.user_attrs["mlflow_run_id"] for t in complete
    )  # one MLflow run per trial
    assert all(c.info.status == "FINISHED" for c in children)
    runs = trial_flow_runs(slurm, "on-slurm")
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED", "COMPLETED"]

    # Once the pool had nothing for them, every worker left and its job ended by itself.
    tasks = [f"{workers}_0", f"{workers}_1"]
    slurm.wait_jobs_gone([drivers, workers], timeout=IDLE_EXIT_S + 60)
    for job in [drivers, *tasks]:
        info = slurm.cluster.job_info(job)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), slurm.log(job)
        assert f"stopped: no flow run for {IDLE_EXIT_S} s" in slurm.log(job)
    # One worker per allocated GPU: Slurm gave each array task its own GPU.
    gpus = {
        line.rsplit(" ", 1)[-1]
        for job in tasks
        for line in slurm.log(job).splitlines()
        if "a worker of pool gpu on GPU" in line
    }
    assert gpus == {"0", "1"}


def test_trials_handed_back_by_their_worker_jobs_are_resumed_by_the_next(slurm):
    """Two trials on the first two of four worker jobs (two at a time): one job is warned of
    its time limit (what ``--signal=B:USR1@300`` sends its shell, here at once with ``scancel
    --batch``), the other is cancelled (``scancel``: SIGTERM to every process of the job,
    SIGKILL after KillWait). Each hands its trial back, and the next two jobs resume them from
    their checkpoints: one MLflow run per trial, nothing left running."""
    name = "handed-back"
    slurm.submit("sweep-drivers.sbatch")
    driver = flow_run_id(slurm.sweep(name, n_trials=2, watch=False, **SLOW))
    slurm.wait_for_queued_trials(name, 2)
    workers = slurm.submit("gpu-workers.sbatch", "--array=0-3%2")
    experiments = slurm.workdir / "artifacts" / "experiments" / name

    def a_round_each() -> bool:
        return len({path.parent for path in experiments.glob("*/step_*.safetensors")}) == 2

    slurm.services.wait_for(a_round_each, "a finished round in each trial", timeout=300)
    lost = slurm.study(name).get_trials(states=(TrialState.RUNNING,))
    assert len(lost) == 2
    assert [slurm.cluster.jobs()[f"{workers}_{task}"] for task in (0, 1)] == ["RUNNING"] * 2
    slurm.cluster.scancel(f"{workers}_0", "--batch", "--signal=USR1")
    slurm.cluster.scancel(f"{workers}_1")

    # The trials hand themselves back at once: failed and queued again, their runs KILLED.
    def handed_back() -> bool:
        trials = slurm.study(name).trials
        return all(trials[t.number].state == TrialState.FAIL for t in lost)

    wait_until(handed_back, "both trials to be queued again", timeout=KILL_WAIT_S + 5)
    killed = mlflow_runs(slurm, name)[1]
    assert sorted(r.info.status for r in killed) == ["KILLED", "KILLED"]

    assert slurm.services.wait_flow_runs({"driver": driver}, 600)["driver"]["type"] == "COMPLETED"
    study = slurm.study(name)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(map(str, (t.params for t in complete))) == sorted(
        map(str, (t.params for t in lost))
    )  # the same two trials, resumed
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(t.number for t in lost)
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    children = mlflow_runs(slurm, name)[1]  # one MLflow run per trial, the same as before
    assert sorted(c.info.run_id for c in children) == sorted(r.info.run_id for r in killed)
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["resumed_at"].startswith("round ") for c in children)
    states = {r["id"]: r["state"]["type"] for r in trial_flow_runs(slurm, name)}
    lost_runs = [t.user_attrs[FLOW_RUNS_ATTR]["0"] for t in lost]  # one replicate each
    assert [states.pop(run_id) for run_id in lost_runs] == ["CRASHED"] * 2
    assert list(states.values()) == ["COMPLETED"] * 2  # nothing left running in Prefect

    slurm.wait_jobs_gone([workers], timeout=IDLE_EXIT_S + 60)
    ended = [slurm.cluster.job_info(f"{workers}_{task}") for task in range(4)]
    assert [(i["JobState"], i["ExitCode"]) for i in ended] == [
        ("COMPLETED", "0:0"),  # warned: handed its trial back, then left before its limit
        ("CANCELLED", "0:0"),  # cancelled: its worker still ended cleanly, within KillWait
        ("COMPLETED", "0:0"),  # resumed a trial to its end, then left when idle
        ("COMPLETED", "0:0"),
    ]
    assert "the job's time is nearly up: SIGTERM to flow run processes" in slurm.log(f"{workers}_0")
    assert all("stopped: no flow run for" in slurm.log(f"{workers}_{task}") for task in (2, 3))


def test_one_experiment_on_the_gpus_of_a_node_continues_after_its_time_limit(slurm):
    """``slurm/ddp-run.sbatch``: ``pwf run --nproc 2`` on the job's two GPUs (DDP; Gloo on
    this CPU). Warned of its time limit (``scancel --batch --signal=USR1``, what
    ``--signal=B:USR1@600`` sends), the run stops with its MLflow run KILLED and the job
    requeues itself; run again, it resumes from its checkpoint and ends."""
    name = "ddp-on-slurm"
    job = slurm.cluster.sbatch(
        "--gres=gpu:2",
        "--cpus-per-task=2",
        "--mem=500M",
        "--time=15",
        str(SLURM / "ddp-run.sbatch"),
        str(ROOT / "configs" / "default.yaml"),
        "--artifacts",
        str(slurm.workdir / "ddp-artifacts"),
        *[
            a
            for key, value in {"name": name, **TINY, **SLOW}.items()
            for a in ("--set", f"{key}={json.dumps(value)}")
        ],
        cwd=slurm.workdir,
    )
    experiments = slurm.workdir / "ddp-artifacts" / "experiments" / name
    slurm.services.wait_for(
        lambda: any(experiments.glob("*/step_01.safetensors")), "round 1 to end", timeout=300
    )
    slurm.cluster.scancel(job, "--batch", "--signal=USR1")
    client = MlflowClient(slurm.services.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(name)

    def killed() -> bool:
        (run,) = client.search_runs([experiment.experiment_id])
        return run.info.status == "KILLED"

    wait_until(killed, "the run to be marked KILLED", timeout=60)
    # Requeued, the job waits for its old credential to expire (cred_expire, 10 s here).
    slurm.wait_jobs_gone([job], timeout=300)
    info = slurm.cluster.job_info(job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["distributed.world_size"] == "2"
    assert run.data.tags["resumed_at"].startswith("round ")
    assert run.data.metrics["final/ws/fixed_fraction"] == 1.0
    log = slurm.log(job)
    assert "pwf: stopped before the time limit; requeued to continue where it stopped" in log
    assert "forcefully exiting via 9" not in log  # every rank ended on its SIGTERM
    assert "(run 1) on" in log and "pwf run on GPUs 0,1" in log
