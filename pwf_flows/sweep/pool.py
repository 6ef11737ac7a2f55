"""A sweep's trials as deployment runs on a work pool: one flow run of ``pwf-experiment/gpu``
per replicate, up to ``execution.max_parallel`` in flight (one per GPU worker).

The driver keeps a trial alive (its heartbeat) while any of its replicates waits in the pool's
queue; once they all run, their flow runs do. A trial that lost its owner (a killed worker) is
failed and queued again by the stale check, and its flow runs are marked crashed in Prefect. A
driver that is rerun adopts the flow runs still going instead of submitting them again.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Crashed

from pwf_flows.links import run_url
from pwf_flows.sweep.driver import POLL_SECONDS, Driver
from pwf_flows.sweep.early_stopping import STOPPED_ATTR
from pwf_flows.sweep.replicates import TrialWork
from pwf_flows.sweep.study import TRIAL_TAG, trials_in
from pwf_flows.sweep.trials import Heartbeats
from pwf_flows.tracking import client as mlflow_client
from pwf_flows.tracking import experiment_id, retried

FLOW_RUNS_ATTR = "prefect_flow_run_ids"  # {replicate: flow run id}


class PoolRunner:
    """Submits a driver's trials' replicates to a work pool and collects them.

    Args:
        driver: The sweep's driver (asking, telling, failing trials).
        deployment: The trial deployment, ``pwf-experiment/gpu``.
    """

    def __init__(self, driver: Driver, deployment: str) -> None:
        self.driver = driver
        self.deployment = deployment
        self.in_flight: dict[Any, tuple[TrialWork, int]] = {}
        self.queue: deque[tuple[TrialWork, int]] = deque()
        self.storage = driver.study._storage

    def run(self, deadline: float | None) -> None:
        driver = self.driver
        with (
            get_client(sync_client=True) as client,
            Heartbeats(driver.study, driver.spec.study.heartbeat_s) as heartbeats,
        ):
            driver.heartbeats = heartbeats
            self._adopt(client, heartbeats)
            while True:
                requeued = driver.fail_stale()
                if requeued:
                    driver.logger.info("trials %s lost their worker: queued again", requeued)
                self._submit(heartbeats, deadline)
                if not self.in_flight:
                    if not driver.wait_for_others(deadline):
                        return
                    continue
                time.sleep(POLL_SECONDS)
                self._collect(client, heartbeats)

    def _submit(self, heartbeats: Heartbeats, deadline: float | None) -> None:
        """Fill the pool up to ``max_parallel`` replicates: queued ones first, then new trials
        (while the deadline allows)."""
        driver = self.driver
        while len(self.in_flight) < driver.spec.execution.max_parallel:
            if not self.queue:
                if deadline is not None and time.time() >= deadline:
                    return
                work = driver.next_trial(heartbeats)
                if work is None:
                    return
                self.queue.extend((work, r) for r in range(len(work.configs)))
            work, replicate = self.queue.popleft()
            if work.stopped is not None:
                continue  # early stopping ended the trial before this replicate ran
            params = driver.parameters(work, replicate, heartbeat=True)
            run = run_deployment(
                self.deployment, parameters=params, flow_run_name=params["run_name"], timeout=0
            )
            self._remember(work, replicate, run.id)
            self.in_flight[run.id] = (work, replicate)
            driver.logger.info(
                "trial %d%s submitted as flow run %s: %s",
                work.number,
                f" replicate {replicate}" if len(work.configs) > 1 else "",
                run.id,
                work.params,
            )

    def _remember(self, work: TrialWork, replicate: int, run_id: Any) -> None:
        known = dict(self.storage.get_trial(work.trial_id).user_attrs.get(FLOW_RUNS_ATTR, {}))
        known[str(replicate)] = str(run_id)
        self.storage.set_trial_user_attr(work.trial_id, FLOW_RUNS_ATTR, known)

    def _adopt(self, client, heartbeats: Heartbeats) -> None:
        """Running trials whose flow runs are still going (or finished while no driver
        watched): adopt them instead of running them again."""
        driver = self.driver
        for trial in trials_in(driver.study, TrialState.RUNNING):
            runs = trial.user_attrs.get(FLOW_RUNS_ATTR, {})
            if not runs:
                continue
            states = {r: client.read_flow_run(run_id).state for r, run_id in runs.items()}
            if not all(
                s is not None and (not s.is_final() or s.is_completed()) for s in states.values()
            ):
                continue
            work = driver.resume_work(trial)
            heartbeats.own(trial._trial_id)
            for replicate, run_id in runs.items():
                self.in_flight[run_id] = (work, int(replicate))
            submitted = {int(r) for r in runs}
            self.queue.extend((work, r) for r in range(len(work.configs)) if r not in submitted)
            driver.logger.info(
                "trial %d: adopted its flow runs %s", trial.number, list(runs.values())
            )

    def _collect(self, client, heartbeats: Heartbeats) -> None:
        driver = self.driver
        for run_id, (work, replicate) in list(self.in_flight.items()):
            state = client.read_flow_run(run_id).state
            if self.storage.get_trial(work.trial_id).state == TrialState.FAIL:
                del self.in_flight[run_id]
                heartbeats.release(work.trial_id)
                if state is not None and not state.is_final():
                    client.set_flow_run_state(
                        run_id,
                        Crashed(message=f"trial {work.number} lost its worker's heartbeat"),
                        force=True,
                    )
                driver.failures += 1
                continue
            if state is None or not state.is_final():
                continue
            del self.in_flight[run_id]
            if not state.is_completed():
                self._drop_queued(work)
                driver.fail(work.number, f"flow run {run_id} ended {state.type.value}", work)
                heartbeats.release(work.trial_id)
                continue
            result = child_result(driver.spec.name, work.number, replicate)
            work.results[replicate] = result
            if result.get("early_stopped"):
                trial = self.storage.get_trial(work.trial_id)
                work.stopped = trial.user_attrs.get(STOPPED_ATTR, result["early_stopped"])
                self._drop_queued(work)
            if work.complete and not self._running(work):
                heartbeats.release(work.trial_id)
                driver.finish(work)
        self._keep_queued_alive(client, heartbeats)

    def _running(self, work: TrialWork) -> bool:
        return any(w is work for w, _ in self.in_flight.values())

    def _drop_queued(self, work: TrialWork) -> None:
        self.queue = deque((w, r) for w, r in self.queue if w is not work)

    def _keep_queued_alive(self, client, heartbeats: Heartbeats) -> None:
        """The driver beats for a trial while a replicate of it waits (queued here or in the
        pool); once all of them run on workers, their flow runs beat."""
        waiting: dict[int, bool] = {}
        for run_id, (work, _) in self.in_flight.items():
            state = client.read_flow_run(run_id).state
            queued = state is None or not state.is_running()
            waiting[work.trial_id] = waiting.get(work.trial_id, False) or queued
        for work, _ in self.queue:
            waiting[work.trial_id] = True
        for trial_id, queued in waiting.items():
            if queued:
                heartbeats.own(trial_id)
            else:
                heartbeats.release(trial_id)


def child_result(experiment: str, number: int, replicate: int) -> dict[str, Any]:
    """Final metrics of a trial's replicate as its MLflow run logged them (trials run
    elsewhere)."""
    client: MlflowClient = mlflow_client()
    mine = (
        f"tags.`{TRIAL_TAG}` = '{number}' and tags.kind = 'experiment' "
        f"and tags.replicate = '{replicate}'"
    )
    runs = retried(
        lambda: client.search_runs([experiment_id(client, experiment)], filter_string=mine),
        "search runs",
    )
    if not runs:
        raise RuntimeError(f"trial {number} (replicate {replicate}) left no MLflow run")
    run = runs[0]
    logged, tags = run.data.metrics, run.data.tags
    result: dict[str, Any] = {
        "metrics": {
            k.removeprefix("final/"): v for k, v in logged.items() if k.startswith("final/")
        },
        "timing": {k: v for k, v in logged.items() if k.startswith("time/")},
        "mlflow_run_id": run.info.run_id,
        "mlflow_run_url": run_url(run.info.experiment_id, run.info.run_id),
        "run_name": run.info.run_name,
        "prefect_url": tags.get("prefect.flow_run_url"),
        "pretrained_accuracy": logged.get("pretrain/test_acc"),
    }
    if "early_stopped.round" in tags:
        last = {
            k: v for k, v in logged.items() if "/" in k and not k.startswith(("final/", "time/"))
        }
        result["metrics"] = last
        result["early_stopped"] = {
            "round": int(tags["early_stopped.round"]),
            "by": [int(n) for n in tags.get("early_stopped.by", "").split(",") if n.strip()],
            "saved_s": logged.get("early_stopped/saved_s", 0.0),
            "whole_s": logged.get("early_stopped/whole_s", 0.0),
        }
    return result
