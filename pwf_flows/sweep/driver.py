"""One sweep process: asks, runs (here or on a work pool), tells, and reports progress.

Trials run in-process (the embedded default: each a Prefect task named after the trial) or,
given a trial deployment (``pwf-experiment/gpu``), as deployment runs on a work pool, up to
``execution.max_parallel`` in flight: one per GPU worker. Several drivers may work on one
study: a trial has a heartbeat from the process that owns it, only a trial whose heartbeat
stopped is failed and retried (with the same parameters, so its experiment resumes from its
checkpoints), a driver adopts the deployment runs still going, and a driver starts a trial only
while complete + running trials are fewer than ``n_trials``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Crashed

from pwf_core.config import ExperimentConfig, config_to_dict
from pwf_flows.experiment import pwf_experiment
from pwf_flows.infra import InfraUnavailable, is_interrupt
from pwf_flows.links import run_url
from pwf_flows.sweep.spec import SweepSpec
from pwf_flows.sweep.study import (
    TRIAL_TAG,
    duplicate_of,
    suggest,
    tell,
    trial_run_name,
    trials_in,
)
from pwf_flows.sweep.trials import Heartbeats, fail_stale, quiet_optuna, requeue
from pwf_flows.tracking import client as mlflow_client
from pwf_flows.tracking import experiment_id, retried

POLL_SECONDS = 2.0


@task(name="trial", cache_policy=NO_CACHE, task_run_name="{run_name}")
def trial_task(parameters: dict[str, Any], run_name: str) -> dict[str, Any]:
    """An in-process trial: the experiment flow's body, its tasks nested under this one.

    A subflow per trial would cost about half a second of Prefect bookkeeping each (a flow
    run created, its states, its logs); a task named after the trial shows the same in the
    sweep's flow run. Trials on a work pool are flow runs of ``pwf-experiment/gpu``.
    """
    return pwf_experiment.fn(**parameters)


class Driver:
    """One sweep process: asks, runs (here or on a pool), tells, and reports progress."""

    def __init__(self, study: optuna.Study, spec: SweepSpec, parent_run_id: str, progress: bool):
        self.study, self.spec = study, spec
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.logger = get_run_logger()
        self.compute_s = 0.0
        self.failures = 0
        self.skipped = 0
        self.heartbeats: Heartbeats | None = None

    def fail_stale(self) -> list[int]:
        """Fail and queue again the trials of drivers or workers that died (never ours)."""
        return fail_stale(self.study, self.heartbeats.owned() if self.heartbeats else set())

    def counts(self) -> tuple[int, int]:
        complete = len(trials_in(self.study, TrialState.COMPLETE))
        running = len(trials_in(self.study, TrialState.RUNNING))
        return complete, running

    def next_trial(self, heartbeats: Heartbeats) -> tuple[optuna.Trial, ExperimentConfig] | None:
        """Ask for a new configuration; ``None`` when the study has enough trials under way."""
        while True:
            complete, running = self.counts()
            if complete + running >= self.spec.n_trials:
                return None
            with quiet_optuna():
                trial = self.study.ask()
            heartbeats.own(trial._trial_id)
            config = suggest(trial, self.spec)
            complete, running = self.counts()
            earlier_running = [
                t for t in trials_in(self.study, TrialState.RUNNING) if t.number < trial.number
            ]
            if complete + len(earlier_running) >= self.spec.n_trials:
                self._drop(trial, heartbeats, "surplus", "another driver took the last slot")
                return None
            duplicate = duplicate_of(self.study, trial)
            if duplicate is None:
                return trial, config
            self._drop(trial, heartbeats, "duplicate_of", duplicate)
            self.skipped += 1
            if self.skipped > 10 * max(self.spec.n_trials, 10):
                raise RuntimeError(
                    f"the sampler keeps proposing configurations that already ran "
                    f"({self.skipped} skipped): the search space has nothing new left"
                )

    def _drop(self, trial: optuna.Trial, heartbeats: Heartbeats, key: str, value: Any) -> None:
        trial.set_user_attr(key, value)
        self.study.tell(trial, state=TrialState.PRUNED)
        heartbeats.release(trial._trial_id)
        if key == "duplicate_of":
            self.logger.info("trial %d repeats trial %s: skipped", trial.number, value)

    def parameters(self, number: int, params: dict, config: ExperimentConfig) -> dict:
        return {
            "config": config_to_dict(config),
            "artifacts_dir": self.spec.execution.artifacts_dir,
            "parent_run_id": self.parent_run_id,
            "progress": self.progress,
            "tags": {TRIAL_TAG: str(number), "sweep": self.spec.name},
            "run_name": trial_run_name(number, params, config.compression.method),
            "source": f"pwf sweep {self.spec.name}",
        }

    def record(self, number: int, result: dict[str, Any]) -> None:
        metrics = result["metrics"]
        self.compute_s += result.get("timing", {}).get("time/compute_s", 0.0)
        tell(self.study, self.spec, number, result)
        complete, _ = self.counts()
        self.logger.info(
            "trial %d done (%d/%d complete): top-1 %.2f %%, %d unique values, MLflow run %s",
            number,
            complete,
            self.spec.n_trials,
            100 * metrics["cls/acc"],
            metrics["ws/unique_values"],
            result.get("mlflow_run_id"),
        )

    def fail(self, number: int, why: str) -> None:
        self.logger.warning("trial %d failed: %s", number, why)
        with contextlib.suppress(UpdateFinishedTrialError):
            self.study.tell(number, state=TrialState.FAIL)
        self.failures += 1
        if self.failures > self.spec.n_trials:
            raise RuntimeError(f"more failed trials ({self.failures}) than trials asked for")

    def wait_for_others(self, deadline: float | None) -> bool:
        """Sleep while other drivers' trials fill the study; ``False`` once it is done."""
        requeued = self.fail_stale()
        if requeued:
            self.logger.info("trials %s lost their owner: failed and queued again", requeued)
            return True
        complete, running = self.counts()
        if complete >= self.spec.n_trials or (deadline is not None and time.time() > deadline):
            return False
        if running:
            time.sleep(POLL_SECONDS)
            return True
        return complete < self.spec.n_trials

    def run_in_process(self, deadline: float | None) -> None:
        """Trials one after another in this process.

        A trial that meets an outage waits it out (the calls inside it retry), so no new
        settings are asked meanwhile. One that the outage outlasts, or that a Ctrl-C or SIGTERM
        stops, is queued again with the same parameters before the driver stops: the same
        command later runs it first, and its experiment resumes from its checkpoints.
        """
        with Heartbeats(self.study, self.spec.study.heartbeat_s) as heartbeats:
            self.heartbeats = heartbeats
            while deadline is None or time.time() < deadline:
                self.fail_stale()
                asked = self.next_trial(heartbeats)
                if asked is None:
                    if not self.wait_for_others(deadline):
                        return
                    continue
                trial, config = asked
                complete, _ = self.counts()
                self.logger.info(
                    "trial %d (%d/%d complete so far): %s",
                    trial.number,
                    complete,
                    self.spec.n_trials,
                    trial.params,
                )
                try:
                    parameters = self.parameters(trial.number, trial.params, config)
                    result = trial_task(parameters, parameters["run_name"])
                except BaseException as err:
                    heartbeats.release(trial._trial_id)
                    if isinstance(err, InfraUnavailable) or is_interrupt(err):
                        with contextlib.suppress(InfraUnavailable):
                            requeue(self.study, trial.number)
                        raise
                    if not isinstance(err, Exception):
                        raise
                    self.fail(trial.number, repr(err))  # recorded; the sweep goes on
                    continue
                heartbeats.release(trial._trial_id)
                self.record(
                    trial.number,
                    {
                        **result,
                        "mlflow_run_id": result["run_id"],
                        "mlflow_run_url": result["url"],
                        "run_name": parameters["run_name"],
                    },
                )

    def adoptable(self, client) -> dict[Any, FrozenTrial]:
        """Running trials whose deployment run is still going (or finished while no driver
        watched): adopt them instead of running them again."""
        adopted = {}
        for trial in trials_in(self.study, TrialState.RUNNING):
            run_id = trial.user_attrs.get("prefect_flow_run_id")
            if run_id is None:
                continue
            state = client.read_flow_run(run_id).state
            if state is not None and (not state.is_final() or state.is_completed()):
                adopted[run_id] = trial
        return adopted

    def trial_parameters(self, trial: optuna.Trial, config: ExperimentConfig) -> dict:
        """A pool trial's flow-run parameters: the trial heartbeats itself while it runs."""
        return self.parameters(trial.number, trial.params, config) | {
            "trial": {
                "storage": self.spec.study.portable_storage(),
                "study": self.spec.name,
                "number": trial.number,
                "heartbeat_s": self.spec.study.heartbeat_s,
            }
        }

    def run_on_pool(self, deployment: str, deadline: float | None) -> None:
        """Trials as deployment runs, up to ``max_parallel`` in flight.

        The driver keeps a queued trial alive; once its flow run runs, the flow run does. A
        trial that lost its owner (a killed worker) is failed and queued again by the stale
        check, and its flow run is marked crashed in Prefect.
        """
        in_flight: dict[Any, int] = {}
        storage = self.study._storage
        with (
            get_client(sync_client=True) as client,
            Heartbeats(self.study, self.spec.study.heartbeat_s) as heartbeats,
        ):
            self.heartbeats = heartbeats
            for run_id, trial in self.adoptable(client).items():
                heartbeats.own(trial._trial_id)
                in_flight[run_id] = trial.number
                self.logger.info("trial %d: adopted its flow run %s", trial.number, run_id)
            while True:
                requeued = self.fail_stale()
                if requeued:
                    self.logger.info("trials %s lost their worker: queued again", requeued)
                while len(in_flight) < self.spec.execution.max_parallel and (
                    deadline is None or time.time() < deadline
                ):
                    asked = self.next_trial(heartbeats)
                    if asked is None:
                        break
                    trial, config = asked
                    params = self.trial_parameters(trial, config)
                    run = run_deployment(
                        deployment,
                        parameters=params,
                        flow_run_name=params["run_name"],
                        timeout=0,
                    )
                    trial.set_user_attr("prefect_flow_run_id", str(run.id))
                    in_flight[run.id] = trial.number
                    self.logger.info(
                        "trial %d submitted as flow run %s: %s", trial.number, run.id, trial.params
                    )
                if not in_flight:
                    if not self.wait_for_others(deadline):
                        return
                    continue
                time.sleep(POLL_SECONDS)
                for run_id, number in list(in_flight.items()):
                    trial_id = storage.get_trial_id_from_study_id_trial_number(
                        self.study._study_id, number
                    )
                    state = client.read_flow_run(run_id).state
                    if storage.get_trial(trial_id).state == TrialState.FAIL:
                        del in_flight[run_id]
                        heartbeats.release(trial_id)
                        if state is not None and not state.is_final():
                            client.set_flow_run_state(
                                run_id,
                                Crashed(message=f"trial {number} lost its worker's heartbeat"),
                                force=True,
                            )
                        self.failures += 1
                        continue
                    if state is None or not state.is_final():
                        if state is not None and state.is_running():
                            heartbeats.release(trial_id)  # the flow run heartbeats now
                        else:
                            heartbeats.own(trial_id)
                        continue
                    del in_flight[run_id]
                    heartbeats.release(trial_id)
                    if state.is_completed():
                        self.record(
                            number, child_result(self.spec.name, self.parent_run_id, number)
                        )
                    else:
                        self.fail(number, f"flow run {run_id} ended {state.type.value}")


def child_result(experiment: str, parent_run_id: str, number: int) -> dict[str, Any]:
    """Final metrics of trial ``number`` as its MLflow run logged them (trials run elsewhere)."""
    client: MlflowClient = mlflow_client()
    mine = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{number}'"
    runs = retried(
        lambda: client.search_runs([experiment_id(client, experiment)], filter_string=mine),
        "search runs",
    )
    if not runs:
        raise RuntimeError(f"trial {number} left no MLflow run under {parent_run_id}")
    logged = runs[0].data.metrics
    return {
        "metrics": {
            k.removeprefix("final/"): v for k, v in logged.items() if k.startswith("final/")
        },
        "timing": {k: v for k, v in logged.items() if k.startswith("time/")},
        "mlflow_run_id": runs[0].info.run_id,
        "mlflow_run_url": run_url(runs[0].info.experiment_id, runs[0].info.run_id),
        "run_name": runs[0].info.run_name,
        "prefect_url": runs[0].data.tags.get("prefect.flow_run_url"),
        "pretrained_accuracy": logged.get("pretrain/test_acc"),
    }
