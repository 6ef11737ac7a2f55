"""The ``pwf`` command.

``pwf run [CONFIG]`` runs the ``pwf-experiment`` flow (the shipped default config when CONFIG
is omitted); ``pwf sweep SWEEP.yaml`` runs the ``pwf`` sweep flow with in-process trials, and
``--report`` prints its trials and Pareto front. Without ``PREFECT_API_URL`` a temporary Prefect
server runs for the length of the command.

Everything that can be checked is checked before Prefect starts, before an MLflow run exists
and before the artifacts folder is written: the config or sweep file, the dataset files, the
weights, the device, and that the model runs on the data. Bad input ends in one ``pwf: ...``
line and exit code 2; Ctrl-C in one line and exit code 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pwf_flows  # noqa: F401  (offline environment defaults before Prefect/MLflow import)
from pwf_core._files import CheckpointError
from pwf_core.config import (
    ConfigError,
    config_to_dict,
    load_config,
    parse_override_strings,
)
from pwf_core.data import DatasetError
from pwf_flows.errors import ServerError, TrackingError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SIZE_KNOBS = {
    "pwfn": "compression.b (smallest power of two 2^-b: lower b, fewer values) and "
    "compression.max_order",
    "wfn": "compression.delta and compression.b",
    "kmeans": "compression.clusters",
    "uniform": "compression.bits",
    "2dgbnn": "compression.gaussians (K before merging) and compression.tau_d (merging)",
}


def _version() -> str:
    try:
        return version("pwf")
    except PackageNotFoundError:
        import pwf_core

        return pwf_core.__version__


def _add_common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (repeatable)",
    )
    parser.add_argument("--artifacts", help="artifacts folder (default: ./artifacts)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pwf", description="Probabilistic weight fixing and stochastic weight sharing"
    )
    parser.add_argument("--version", action="version", version=f"pwf {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment (the pwf-experiment flow)")
    run.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})",
    )
    _add_common(run, "a config field, e.g. --set compression.reg=0.001")
    run.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes (one per GPU; DDP, NCCL on GPUs, Gloo on CPUs)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over even if this experiment finished (its MLflow run is kept)",
    )
    sweep = commands.add_parser("sweep", help="run or continue an Optuna sweep (the pwf flow)")
    sweep.add_argument("sweep", type=Path, help="sweep YAML, e.g. sweeps/full-sweep.yaml")
    _add_common(sweep, "a sweep field, e.g. --set study.n_trials=4")
    sweep.add_argument(
        "--report",
        action="store_true",
        help="print the study's trials and Pareto front, run nothing",
    )
    return parser


def check_artifacts_dir(path: str) -> str:
    """Raise :class:`ConfigError` unless ``path`` is (or can become) a writable folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--artifacts: '{folder}' is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--artifacts: cannot create or write '{folder}' ({existing})")
    return path


def _check_tracking(experiment: str) -> None:
    """Fail early when MLflow cannot take runs for ``experiment`` (e.g. it was deleted)."""
    from pwf_flows.tracking import client

    existing = client().get_experiment_by_name(experiment)
    if existing is not None and existing.lifecycle_stage == "deleted":
        from pwf_flows.tracking import experiment_id

        experiment_id(client(), experiment)  # raises the explanation


def _browse_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    from pwf_core.distributed import init_from_environment, is_main
    from pwf_core.preflight import preflight

    config = load_config(args.config, parse_override_strings(args.overrides))
    artifacts = check_artifacts_dir(args.artifacts or "artifacts")
    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1, got {args.nproc}")
    distributed = init_from_environment()
    if distributed and not is_main():
        from pwf_flows.distributed import follow

        follow(config)  # rank 0 checked the input and runs the flow; follow its lead
        return 0
    preflight(config)
    _check_tracking(config.name)
    if args.nproc > 1 and not distributed:
        from pwf_flows.distributed import relaunch

        return relaunch(_without_nproc(argv), args.nproc)
    try:
        return _run(config, artifacts, args)
    finally:
        if distributed:
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


def _run(config, artifacts: str, args: argparse.Namespace) -> int:
    from pwf_flows.artifacts import ExperimentFiles
    from pwf_flows.results import finished_result
    from pwf_flows.server import prefect_api

    started = time.perf_counter()
    files = ExperimentFiles.for_config(config, artifacts)
    result = None if args.fresh else finished_result(config, files)
    if result is None:
        with prefect_api():
            from pwf_flows.experiment import pwf_experiment  # Prefect reads the server URL now

            result = pwf_experiment(
                config=config_to_dict(config),
                artifacts_dir=artifacts,
                progress=not args.no_progress,
                fresh=args.fresh,
                source=f"pwf run {args.config}",
            )
    metrics = result["metrics"]
    verb = "was already complete (nothing changed; --fresh to run again)"
    if not result["already_complete"]:
        verb = f"finished in {time.perf_counter() - started:.0f} s"
    knob = SIZE_KNOBS.get(config.compression.method)
    print(
        f"\npwf run {verb}\n  {_result_line(metrics)}\n"
        + (f"  fewer or more values: turn {knob}\n" if knob else "")
        + f"  artifacts:  {result['artifacts']}\n"
        f"  MLflow run: {result['run_id']} in experiment '{result['experiment']}' "
        f"({result['tracking_uri']})\n"
        f"  run page:   {result['url']}\n"
        f"  browse:     {_browse_hint(result['tracking_uri'])}"
    )
    return 0


def _result_line(metrics: dict[str, float]) -> str:
    accuracy = f"top-1 {100 * metrics['cls/acc']:.2f} %"
    if "bnn/gaussians" in metrics:
        return (
            f"{accuracy}, NLL {metrics['cls/nll']:.4f}, ECE {metrics['cal/ece']:.4f} with "
            f"{int(metrics['bnn/gaussians'])} shared Gaussians, {int(metrics['bnn/outliers'])} "
            f"outliers; {int(metrics['size/trainable_params']):,} trainable parameters "
            f"(mean-field BNN: {int(metrics['meanfield/size/trainable_params']):,})"
        )
    return (
        f"{accuracy} with {int(metrics['ws/unique_values'])} unique values "
        f"({100 * metrics['ws/fixed_fraction']:.0f} % of weights fixed)"
    )


def sweep_command(args: argparse.Namespace) -> int:
    from pwf_flows.sweep_spec import load_sweep, masked_url

    overrides = parse_override_strings(args.overrides)
    if args.artifacts:
        overrides["execution.artifacts_dir"] = check_artifacts_dir(args.artifacts)
    spec = load_sweep(args.sweep, overrides)
    check_artifacts_dir(spec.execution.artifacts_dir)
    if args.report:
        from pwf_flows.sweep import pareto_report  # imports Optuna: after validation

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
    _check_tracking(spec.name)
    from pwf_flows.server import prefect_api

    started = time.perf_counter()
    with prefect_api():
        from pwf_flows.sweep import pwf  # Prefect reads the server URL now

        result = pwf(sweep=str(args.sweep), overrides=overrides, progress=not args.no_progress)
    timing = result["timing"]
    print(
        f"\npwf sweep finished in {time.perf_counter() - started:.0f} s: "
        f"{result['complete_trials']} complete trials in study '{result['study']}'\n"
        f"  orchestration overhead: {timing['sweep/orchestration_s']:.0f} s of "
        f"{timing['sweep/wall_s']:.0f} s (training, fixing and evaluation: "
        f"{timing['sweep/compute_s']:.0f} s)\n"
        f"  MLflow parent run: {result['mlflow_run_id']} ({result['url']})\n"
        f"  Pareto front: pwf sweep {args.sweep} --report"
    )
    return 0


def one_line(message: str) -> str:
    """A possibly multi-line error as one line: ``title: field: problem; field: problem``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} " + "; ".join(lines[1:])
    return "; ".join(lines)


def _quiet_prefect() -> None:
    """After Ctrl-C, Prefect's engine would log the interruption as a crash with a traceback."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args, argv)
        return sweep_command(args)
    except KeyboardInterrupt:
        _quiet_prefect()
        print("\npwf: interrupted; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DatasetError, CheckpointError, TrackingError, ServerError) as err:
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
