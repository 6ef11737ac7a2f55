"""A sweep's cross-links: its MLflow parent run's description and its notes in optuna-dashboard.

optuna-dashboard renders a study's and a trial's note as markdown (``optuna_dashboard.
save_note``), so a link written there is one click away, where a user attribute is plain text.
Each trial's note links its MLflow run (and its Prefect run); the study's note links the
sweep's parent run, its report and MLflow's comparison of the trials, which the parent's
description in MLflow links too (with the study's page in optuna-dashboard).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from prefect.runtime import flow_run

from pwf_flows.links import artifact_url, compare_url, experiment_url, optuna_study_url
from pwf_flows.sweep.spec import SweepSpec
from pwf_flows.tracking import RunTracker, note

REPORT = "report/report.html"  # the sweep's report among its parent run's artifacts


def trial_note(number: int, result: Mapping[str, Any]) -> str:
    """Trial ``number``'s note: its run's name and links (the trial's MLflow run first)."""
    title = result.get("run_name") or f"trial {number}"
    links = {"MLflow run": result.get("mlflow_run_url"), "Prefect": result.get("prefect_url")}
    return note(f"### {title}", links)


def save_trial_note(study: optuna.Study, trial_id: int, note_text: str) -> None:
    """Write a trial's note (shown on its page in optuna-dashboard)."""
    _save_note(optuna.Trial(study, trial_id), note_text)


def _save_note(study_or_trial: optuna.Study | optuna.Trial, text: str) -> None:
    # Imported here: optuna-dashboard brings scikit-learn (0.4 s), and every trial's process
    # imports this module through the experiment flow, though only sweep drivers write notes.
    from optuna_dashboard import save_note

    save_note(study_or_trial, text)


def sweep_links(
    parent: RunTracker, study: optuna.Study, spec: SweepSpec, trial_run_ids: Sequence[str] = ()
) -> dict[str, str | None]:
    """The pages a sweep's description names: its Prefect flow run, its report, its MLflow
    experiment, MLflow's comparison of its trials (once there are any) and, for a SQLite study
    (what ``pwf ui`` serves), its page in optuna-dashboard."""
    uri = parent.client.tracking_uri
    links = {
        "Prefect flow run": flow_run.ui_url if flow_run.id else None,
        "the trials compared": artifact_url(parent.experiment_id, parent.run_id, REPORT, uri),
        "every trial in MLflow": experiment_url(parent.experiment_id, uri),
        "MLflow's comparison": (
            compare_url([parent.experiment_id], trial_run_ids, uri) if trial_run_ids else None
        ),
    }
    if spec.study.resolved_storage().startswith("sqlite"):
        links["Optuna study"] = optuna_study_url(study._study_id)
    return links


def describe_sweep(
    parent: RunTracker,
    study: optuna.Study,
    spec: SweepSpec,
    about: str,
    trial_run_ids: Sequence[str] = (),
) -> None:
    """The sweep's description in MLflow and its study note in optuna-dashboard.

    Drivers sharing a study call this in turn (the note is study attributes that two writers
    would both insert).

    Args:
        parent: The sweep's MLflow parent run.
        study: The sweep's study.
        spec: The sweep.
        about: What the sweep is, in a sentence.
        trial_run_ids: The complete trials' MLflow runs, for MLflow's comparison of them.
    """
    links = sweep_links(parent, study, spec, trial_run_ids)
    parent.set_tags({"mlflow.note.content": note(about, links)})
    in_optuna = {"MLflow parent run": parent.url} | {
        label: url for label, url in links.items() if label != "Optuna study"
    }
    _save_note(study, note(f"### {spec.name}\n\n{about}", in_optuna))
