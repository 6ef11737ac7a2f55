"""``pwf sweep``: run or continue an Optuna study through the ``pwf`` flow, print its trials
and Pareto front (``--report``), or replay its early-stopping rule (``--replay``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pwf_core.config import parse_override_strings
from pwf_flows.checks import (
    ServerChecks,
    check_artifacts_dir,
    check_disk,
    check_tracking_experiment,
    check_tracking_uri,
)
from pwf_flows.commands.failures import no_tracebacks_for_expected_failures
from pwf_flows.infra import set_infra_timeout
from pwf_flows.links import browse_hint


def sweep_command(args: argparse.Namespace) -> int:
    from pwf_flows.sweep.spec import load_sweep, masked_url

    overrides = parse_override_strings(args.overrides)
    if args.artifacts:
        overrides["execution.artifacts_dir"] = check_artifacts_dir(args.artifacts)
    spec = load_sweep(args.sweep, overrides)
    check_tracking_uri()
    args.artifacts_folder = check_artifacts_dir(spec.execution.artifacts_dir)
    if args.replay:
        from pwf_flows.sweep.report import replay_report  # imports Optuna: after validation

        print(replay_report(spec))
        return 0
    if args.report:
        from pwf_flows.sweep.report import pareto_report  # imports Optuna: after validation

        table = pareto_report(spec)
        if table is None:
            print(
                f"pwf: no study '{spec.name}' in {masked_url(spec.study.resolved_storage())} yet",
                file=sys.stderr,
            )
            return 1
        where = masked_url(spec.study.resolved_storage())
        print(f"study '{spec.name}' ({where}): {len(table)} complete trials")
        print(table.to_string(index=False) if not table.empty else "(no complete trial)")
        return 0
    set_infra_timeout(spec.infra_timeout_s)
    ServerChecks(storage=spec.study.resolved_storage()).wait()
    runs = spec.n_trials * spec.study.replicates  # each replicate is a run of its own
    check_disk(spec.trial_config({}), spec.execution.artifacts_dir, runs=runs)
    check_tracking_experiment(spec.name)
    from pwf_flows.server import prefect_api

    started = time.perf_counter()
    with prefect_api():
        from pwf_flows.sweep.flow import pwf  # Prefect reads the server URL now

        no_tracebacks_for_expected_failures()
        result = pwf(sweep=str(args.sweep), overrides=overrides, progress=not args.no_progress)
    timing = result["timing"]
    verb = f"finished in {time.perf_counter() - started:.0f} s"
    if result.get("already_complete"):
        verb = "was already complete (nothing changed; raise study.n_trials to continue it)"
    print(
        f"\npwf sweep {verb}: "
        f"{result['complete_trials']} complete trials in study '{result['study']}'\n"
        f"  orchestration overhead: {timing['sweep/orchestration_s']:.0f} s of "
        f"{timing['sweep/wall_s']:.0f} s (training, fixing and evaluation: "
        f"{timing['sweep/compute_s']:.0f} s)\n"
        + _early_stopping_line(timing)
        + f"  MLflow parent run: {result['mlflow_run_id']} ({result['url']})\n"
        f"  Pareto front: pwf sweep {args.sweep} --report\n"
        f"  browse: {browse_hint(os.environ['MLFLOW_TRACKING_URI'])}"
    )
    return 0


def _early_stopping_line(timing: dict[str, float]) -> str:
    """What early stopping saved, when it stopped any trial."""
    stopped = int(timing.get("sweep/early_stopped", 0))
    if not stopped:
        return ""
    saved, spent = timing.get("sweep/saved_s", 0.0), timing["sweep/compute_s"]
    share = saved / (saved + spent) if saved + spent else 0.0
    return (
        f"  early stopping: {stopped} trials stopped part way, about {saved:.0f} s of compute "
        f"saved ({100 * share:.0f} % of what running them to their end would have cost)\n"
    )
