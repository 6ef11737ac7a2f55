"""One sweep process: asks, runs (here or on a work pool), tells, and reports progress.

Trials run in-process (the embedded default: each replicate a Prefect task named after the
trial) or, given a trial deployment (``pwf-experiment/gpu``), as deployment runs on a work pool
(:mod:`pwf_flows.sweep.pool`), up to ``execution.max_parallel`` replicates in flight: one per
GPU worker. Several drivers may work on one study: a trial has a heartbeat from the process
that owns it, only a trial whose heartbeat stopped is failed and retried (with the same
parameters, so its experiments resume from their checkpoints), and a driver starts a trial only
while the trials done (complete, or stopped early) and running are fewer than ``n_trials``.

A trial with replicates (:mod:`pwf_flows.sweep.replicates`) is done when every replicate
finished, or when early stopping (:mod:`pwf_flows.sweep.early_stopping`) stopped one of them:
its remaining replicates are not run, and it is PRUNED in Optuna.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pwf_core.config import ExperimentConfig, config_to_dict
from pwf_flows.experiment import pwf_experiment
from pwf_flows.infra import InfraUnavailable, is_interrupt
from pwf_flows.sweep.early_stopping import STOPPED_ATTR
from pwf_flows.sweep.replicates import TrialRun, TrialWork, objective_attrs, summarise
from pwf_flows.sweep.spec import SweepSpec
from pwf_flows.sweep.study import (
    TRIAL_TAG,
    duplicate_of,
    prune,
    suggest,
    tell,
    trial_run_name,
    trials_done,
    trials_in,
)
from pwf_flows.sweep.trials import Heartbeats, fail_stale, quiet_optuna, requeue

POLL_SECONDS = 2.0


@task(name="trial", cache_policy=NO_CACHE, task_run_name="{run_name}")
def trial_task(parameters: dict[str, Any], run_name: str) -> dict[str, Any]:
    """An in-process trial's replicate: the experiment flow's body, its tasks nested under
    this one.

    A subflow per trial would cost about half a second of Prefect bookkeeping each (a flow
    run created, its states, its logs); a task named after the trial shows the same in the
    sweep's flow run. Trials on a work pool are flow runs of ``pwf-experiment/gpu``.
    """
    return pwf_experiment.fn(**parameters)


class Driver:
    """One sweep process: asks, runs (here or on a pool), tells, and reports progress.

    Args:
        study: The Optuna study.
        spec: The sweep.
        parent_run_id: The sweep's MLflow run.
        progress: Progress bars in the trials.
        folder: The sweep's artifacts folder (its trials' MLflow runs are recorded there).
    """

    def __init__(
        self,
        study: optuna.Study,
        spec: SweepSpec,
        parent_run_id: str,
        progress: bool,
        folder: Path,
    ) -> None:
        self.study, self.spec = study, spec
        self.parent_run_id = parent_run_id
        self.progress = progress
        self.folder = folder
        self.logger = get_run_logger()
        self.compute_s = 0.0
        self.saved_s = 0.0
        self.stopped_early = 0
        self.failures = 0
        self.skipped = 0
        self.heartbeats: Heartbeats | None = None

    def fail_stale(self) -> list[int]:
        """Fail and queue again the trials of drivers or workers that died (never ours)."""
        return fail_stale(self.study, self.heartbeats.owned() if self.heartbeats else set())

    def counts(self) -> tuple[int, int]:
        """Trials done (complete, or stopped early) and running."""
        return len(trials_done(self.study)), len(trials_in(self.study, TrialState.RUNNING))

    def next_trial(self, heartbeats: Heartbeats) -> TrialWork | None:
        """Ask for a new configuration; ``None`` when the study has enough trials under way."""
        while True:
            done, running = self.counts()
            if done + running >= self.spec.n_trials:
                return None
            with quiet_optuna():
                trial = self.study.ask()
            heartbeats.own(trial._trial_id)
            suggest(trial, self.spec)
            done, _ = self.counts()
            earlier_running = [
                t for t in trials_in(self.study, TrialState.RUNNING) if t.number < trial.number
            ]
            if done + len(earlier_running) >= self.spec.n_trials:
                self._drop(trial, heartbeats, "surplus", "another driver took the last slot")
                return None
            duplicate = duplicate_of(self.study, trial)
            if duplicate is None:
                return self._work(trial)
            self._drop(trial, heartbeats, "duplicate_of", duplicate)
            self.skipped += 1
            if self.skipped > 10 * max(self.spec.n_trials, 10):
                raise RuntimeError(
                    f"the sampler keeps proposing configurations that already ran "
                    f"({self.skipped} skipped): the search space has nothing new left"
                )

    def _work(self, trial: optuna.Trial | FrozenTrial) -> TrialWork:
        """The trial's replicates, and its MLflow run when it has more than one."""
        replicates = self.spec.study.replicates
        configs = [self.spec.trial_config(trial.params, r) for r in range(replicates)]
        work = TrialWork(trial.number, trial._trial_id, dict(trial.params), configs)
        if replicates > 1:
            work.run = TrialRun.open(
                self.spec,
                self.parent_run_id,
                trial.number,
                self.run_name(work),
                configs[0],
                self.folder,
                self.tags(trial.number),
            )
            for key, value in (
                ("mlflow_run_id", work.run.run_id),
                ("mlflow_run_url", work.run.url),
            ):
                self.study._storage.set_trial_user_attr(trial._trial_id, key, value)
        return work

    def resume_work(self, trial: FrozenTrial) -> TrialWork:
        """A running trial of an earlier driver, to adopt (its MLflow run reopened)."""
        return self._work(trial)

    def _drop(self, trial: optuna.Trial, heartbeats: Heartbeats, key: str, value: Any) -> None:
        trial.set_user_attr(key, value)
        self.study.tell(trial, state=TrialState.PRUNED)
        heartbeats.release(trial._trial_id)
        if key == "duplicate_of":
            self.logger.info("trial %d repeats trial %s: skipped", trial.number, value)

    def tags(self, number: int, replicate: int | None = None) -> dict[str, str]:
        tags = {TRIAL_TAG: str(number), "sweep": self.spec.name}
        return tags | ({"replicate": str(replicate)} if replicate is not None else {})

    def run_name(self, work: TrialWork, replicate: int | None = None) -> str:
        name = trial_run_name(work.number, work.params, work.configs[0].compression.method)
        return name if replicate is None else f"{name} r{replicate}"

    def parameters(self, work: TrialWork, replicate: int, heartbeat: bool) -> dict[str, Any]:
        """The experiment flow's parameters for one replicate of a trial.

        Args:
            heartbeat: The replicate's run keeps the trial's heartbeat (a flow run on a
                worker); in-process, the driver does.
        """
        with_replicates = work.run is not None
        config: ExperimentConfig = work.configs[replicate]
        return {
            "config": config_to_dict(config),
            "artifacts_dir": self.spec.execution.artifacts_dir,
            "parent_run_id": work.run.run_id if work.run is not None else self.parent_run_id,
            "progress": self.progress,
            "tags": self.tags(work.number, replicate if with_replicates else None),
            "run_name": self.run_name(work, replicate if with_replicates else None),
            "source": f"pwf sweep {self.spec.name}",
            "trial": {
                "storage": self.spec.study.portable_storage(),
                "study": self.spec.name,
                "number": work.number,
                "heartbeat_s": self.spec.study.heartbeat_s,
                "heartbeat": heartbeat,
                "replicate": replicate,
                "objectives": list(self.spec.study.objectives),
                "rule": (
                    self.spec.study.early_stopping.model_dump()
                    if self.spec.study.early_stopping is not None
                    else None
                ),
            },
        }

    def finish(self, work: TrialWork) -> None:
        """Tell Optuna what the trial's replicates add up to (or that it stopped early), and
        close its MLflow run."""
        results = work.finished_results()
        self.compute_s += sum(r.get("timing", {}).get("time/compute_s", 0.0) for r in results)
        summaries = summarise([r["metrics"] for r in results if not r.get("early_stopped")])
        if work.stopped is not None:
            self._stopped(work, results)
        else:
            attrs = objective_attrs(self.spec, summaries)
            first = results[0]
            tell(
                self.study,
                self.spec,
                work.number,
                {
                    "metrics": {key: s.mean for key, s in summaries.items()},
                    "mlflow_run_id": work.run.run_id if work.run else first.get("mlflow_run_id"),
                    "mlflow_run_url": work.run.url if work.run else first.get("mlflow_run_url"),
                    "pretrained_accuracy": first.get("pretrained_accuracy"),
                    "run_name": self.run_name(work),
                    "prefect_url": None if work.run else first.get("prefect_url"),
                },
                attrs,
            )
            done, _ = self.counts()
            accuracy = summaries.get("cls/acc")
            values = summaries.get("ws/unique_values")
            self.logger.info(
                "trial %d done (%d/%d): top-1 %s, %s unique values%s",
                work.number,
                done,
                self.spec.n_trials,
                "?" if accuracy is None else f"{100 * accuracy.mean:.2f} %",
                "?" if values is None else f"{values.mean:.0f}",
                f" (mean of {len(results)} replicates)" if len(results) > 1 else "",
            )
        if work.run is not None:
            work.run.close(summaries, work.stopped)

    def _stopped(self, work: TrialWork, results: list[dict[str, Any]]) -> None:
        stopped = work.stopped or {}
        saved = sum(r.get("early_stopped", {}).get("saved_s", 0.0) for r in results)
        not_run = len(work.configs) - len(results)
        if results and not_run:  # the replicates not run at all save a whole trial each
            whole = [r.get("early_stopped", {}).get("whole_s", 0.0) for r in results]
            saved += not_run * max(whole)
        self.saved_s += saved
        self.stopped_early += 1
        last = next((r for r in results if r.get("early_stopped")), results[-1])
        links = {
            "mlflow_run_id": work.run.run_id if work.run else last.get("mlflow_run_id"),
            "mlflow_run_url": work.run.url if work.run else last.get("mlflow_run_url"),
            "run_name": f"{self.run_name(work)}: stopped after round {stopped.get('round')}",
        }
        prune(
            self.study, self.spec, work.number, last["metrics"], stopped | {"saved_s": saved}, links
        )
        self.logger.info(
            "trial %d stopped after round %s: beaten there by trials %s (about %.0f s of "
            "compute saved)",
            work.number,
            stopped.get("round"),
            ", ".join(map(str, stopped.get("by", []))) or "?",
            saved,
        )

    def fail(self, number: int, why: str, work: TrialWork | None = None) -> None:
        self.logger.warning("trial %d failed: %s", number, why)
        with contextlib.suppress(UpdateFinishedTrialError):
            self.study.tell(number, state=TrialState.FAIL)
        if work is not None and work.run is not None:
            work.run.fail()
        self.failures += 1
        if self.failures > self.spec.n_trials:
            raise RuntimeError(f"more failed trials ({self.failures}) than trials asked for")

    def wait_for_others(self, deadline: float | None) -> bool:
        """Sleep while other drivers' trials fill the study; ``False`` once it is done."""
        requeued = self.fail_stale()
        if requeued:
            self.logger.info("trials %s lost their owner: failed and queued again", requeued)
            return True
        done, running = self.counts()
        if done >= self.spec.n_trials or (deadline is not None and time.time() > deadline):
            return False
        if running:
            time.sleep(POLL_SECONDS)
            return True
        return done < self.spec.n_trials

    def run_in_process(self, deadline: float | None) -> None:
        """Trials one after another in this process, each replicate after the other.

        A trial that meets an outage waits it out (the calls inside it retry), so no new
        settings are asked meanwhile. One that the outage outlasts, or that a Ctrl-C or SIGTERM
        stops, is queued again with the same parameters before the driver stops: the same
        command later runs it first, and its experiments resume from their checkpoints.
        """
        with Heartbeats(self.study, self.spec.study.heartbeat_s) as heartbeats:
            self.heartbeats = heartbeats
            while deadline is None or time.time() < deadline:
                self.fail_stale()
                work = self.next_trial(heartbeats)
                if work is None:
                    if not self.wait_for_others(deadline):
                        return
                    continue
                done, _ = self.counts()
                self.logger.info(
                    "trial %d (%d/%d done so far): %s",
                    work.number,
                    done,
                    self.spec.n_trials,
                    work.params,
                )
                try:
                    self._run_replicates(work)
                except BaseException as err:
                    heartbeats.release(work.trial_id)
                    if isinstance(err, InfraUnavailable) or is_interrupt(err):
                        with contextlib.suppress(InfraUnavailable):
                            requeue(self.study, work.number)
                        raise
                    if not isinstance(err, Exception):
                        raise
                    self.fail(work.number, repr(err), work)  # recorded; the sweep goes on
                    continue
                heartbeats.release(work.trial_id)
                self.finish(work)

    def _run_replicates(self, work: TrialWork) -> None:
        for replicate in range(len(work.configs)):
            parameters = self.parameters(work, replicate, heartbeat=False)
            result = trial_task(parameters, parameters["run_name"])
            work.results[replicate] = {
                **result,
                "mlflow_run_id": result["run_id"],
                "mlflow_run_url": result["url"],
            }
            if result.get("early_stopped"):
                work.stopped = self.study._storage.get_trial(work.trial_id).user_attrs.get(
                    STOPPED_ATTR, result["early_stopped"]
                )
                return
