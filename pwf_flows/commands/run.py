"""``pwf run``: one experiment (or its replicates) through the ``pwf-experiment`` flow.

Everything that can be checked is checked before Prefect starts, before an MLflow run exists
and before the artifacts folder is written; a finished experiment is answered from its stored
result without a server.
"""

from __future__ import annotations

import argparse
import sys
import time

from pwf_core.config import ConfigError, config_to_dict, load_config, parse_override_strings
from pwf_core.registry import create_method
from pwf_flows.checks import (
    ServerChecks,
    already_finished,
    check_artifacts_dir,
    check_disk,
    check_not_running,
    check_tracking_experiment,
    check_tracking_uri,
)
from pwf_flows.commands.failures import no_tracebacks_for_expected_failures
from pwf_flows.infra import is_interrupt, set_infra_timeout
from pwf_flows.links import browse_hint


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    from pwf_core.distributed import init_from_environment, is_main
    from pwf_core.preflight import preflight

    overrides = parse_override_strings(args.overrides)
    if args.keep_checkpoints:
        overrides["execution.keep_checkpoints"] = True
    config = load_config(args.config, overrides)
    check_tracking_uri()
    artifacts = check_artifacts_dir(args.artifacts or "artifacts")
    args.artifacts_folder = artifacts
    set_infra_timeout(config.execution.infra_timeout_s)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1, got {args.nproc}")
    if not 1 <= args.replicates <= 100:
        raise ConfigError(f"--replicates: must be 1 to 100, got {args.replicates}")
    if args.replicates > 1 and args.nproc > 1:
        raise ConfigError("--replicates and --nproc: run the replicates one at a time on one GPU")
    replicates = [
        config.model_copy(update={"replicate": config.replicate.model_copy(update={"index": r})})
        for r in range(config.replicate.index, config.replicate.index + args.replicates)
    ]
    distributed = init_from_environment()
    if distributed and not is_main():
        from pwf_flows.distributed import follow

        follow(config)  # rank 0 checked the input and runs the flow; follow its lead
        return 0
    servers = ServerChecks()  # they answer (or not) while the input is checked
    preflight(config)
    for replicate in replicates:
        check_not_running(replicate, artifacts)
    servers.wait()
    unfinished = [r for r in replicates if args.fresh or not already_finished(r, artifacts)]
    if unfinished:
        check_disk(unfinished[0], artifacts, runs=len(unfinished))
    check_tracking_experiment(config.name)
    if args.nproc > 1 and not distributed:
        from pwf_flows.distributed import relaunch

        return relaunch(_without_nproc(argv), args.nproc)
    try:
        if len(replicates) > 1:
            return _run_replicates(replicates, artifacts, args)
        return _run(config, artifacts, args)
    finally:
        # After Ctrl-C or SIGTERM the other ranks were signalled too, and one may wait in a
        # collective this rank left: leave without a word (the closed connections end it).
        if distributed and not is_interrupt(sys.exc_info()[1]):
            from pwf_flows.distributed import lead

            lead("done")


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def _results(configs: list, artifacts: str, args: argparse.Namespace) -> list[dict]:
    """Run (or find finished) each config's experiment, in order, in one Prefect server."""
    from pwf_flows.artifacts import ExperimentFiles
    from pwf_flows.results import finished_result
    from pwf_flows.server import prefect_api

    results: list[dict | None] = [
        None if args.fresh else finished_result(c, ExperimentFiles.for_config(c, artifacts))
        for c in configs
    ]
    if all(r is not None for r in results):
        return results  # type: ignore[return-value]
    with prefect_api():
        from pwf_flows.experiment import pwf_experiment  # Prefect reads the server URL now

        no_tracebacks_for_expected_failures()
        for i, config in enumerate(configs):
            if results[i] is None:
                results[i] = pwf_experiment(
                    config=config_to_dict(config),
                    artifacts_dir=artifacts,
                    progress=not args.no_progress,
                    fresh=args.fresh,
                    source=f"pwf run {args.config}",
                )
    return results  # type: ignore[return-value]


def _run_replicates(configs: list, artifacts: str, args: argparse.Namespace) -> int:
    from pwf_flows.report.statistics import summarize
    from pwf_flows.tracking import shown_uri

    started = time.perf_counter()
    results = _results(configs, artifacts, args)
    method = create_method(configs[0].compression)
    lines = [
        f"  replicate {c.replicate.index}: {method.summary_line(r['metrics'])} ({r['url']})"
        for c, r in zip(configs, results, strict=True)
    ]
    summaries = []
    for key, label, scale, unit in (
        ("cls/acc", "top-1", 100.0, " %"),
        ("ws/unique_values", "unique values", 1.0, ""),
    ):
        values = [r["metrics"][key] for r in results if key in r["metrics"]]
        if values:
            s = summarize([scale * v for v in values])
            summaries.append(
                f"  {label}: {s.mean:.2f}{unit} ± {s.sd:.2f} (95 % interval "
                f"{s.low:.2f} to {s.high:.2f}, n = {s.n})"
            )
    first = results[0]
    print(
        f"\npwf run of {len(configs)} replicates finished in "
        f"{time.perf_counter() - started:.0f} s\n"
        + "\n".join(lines + summaries)
        + f"\n  MLflow: experiment '{first['experiment']}' "
        f"({shown_uri(first['tracking_uri'])}); the replicates' runs share the tag 'setting'\n"
        f"  compare:    pwf report --experiment {first['experiment']}"
    )
    return 0


def _run(config, artifacts: str, args: argparse.Namespace) -> int:
    from pwf_flows.tracking import shown_uri

    started = time.perf_counter()
    (result,) = _results([config], artifacts, args)
    from pwf_flows.experiment.summary import size_line

    metrics = result["metrics"]
    verb = "was already complete (nothing changed; --fresh to run again)"
    if not result["already_complete"]:
        verb = f"finished in {time.perf_counter() - started:.0f} s"
    method = create_method(config.compression)
    knob = method.size_knob
    print(
        f"\npwf run {verb}\n  {method.summary_line(metrics)}\n"
        f"  model file: {size_line(metrics)}\n"
        + (f"  fewer or more values: turn {knob}\n" if knob else "")
        + f"  artifacts:  {result['artifacts']}\n"
        f"  MLflow run: {result['run_id']} in experiment '{result['experiment']}' "
        f"({shown_uri(result['tracking_uri'])})\n"
        f"  run page:   {result['url']}\n"
        + (f"  Prefect:    {result['prefect_url']}\n" if result.get("prefect_url") else "")
        + f"  browse:     {browse_hint(shown_uri(result['tracking_uri']))}"
    )
    return 0
