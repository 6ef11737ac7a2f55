"""The ``pwf`` command.

``pwf run [CONFIG] [--set section.field=value ...]`` runs the ``pwf-experiment`` flow (the
shipped default config when CONFIG is omitted) without any Prefect server: Prefect starts an
ephemeral one. ``pwf sweep SWEEP.yaml`` runs the ``pwf`` sweep flow with in-process trials;
``--report`` prints its Pareto front. Configs and sweeps are validated before Prefect, MLflow or
Optuna start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flows  # noqa: F401  (offline environment defaults before Prefect/MLflow import)
from pwf_core.checkpoint import CheckpointError
from pwf_core.config import ConfigError, config_to_dict, load_config, parse_override_strings
from pwf_core.data import DatasetError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def _add_overrides(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwf", description="Probabilistic weight fixing pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment (the pwf-experiment flow)")
    run.add_argument(
        "config",
        nargs="?",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})",
    )
    _add_overrides(run, "a config field, e.g. --set fixing.reg=0.001")
    run.add_argument(
        "--artifacts", default="artifacts", help="artifacts folder (default: ./artifacts)"
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sweep = commands.add_parser("sweep", help="run or continue an Optuna sweep (the pwf flow)")
    sweep.add_argument("sweep", type=Path, help="sweep YAML, e.g. sweeps/full-sweep.yaml")
    _add_overrides(sweep, "a sweep field, e.g. --set study.n_trials=4")
    sweep.add_argument(
        "--report",
        action="store_true",
        help="print the study's trials and Pareto front, run nothing",
    )
    return parser


def _browse_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, parse_override_strings(args.overrides))
    from flows.experiment import pwf_experiment  # imports Prefect: after validation

    started = time.perf_counter()
    result = pwf_experiment(
        config=config_to_dict(config), artifacts_dir=args.artifacts, progress=not args.no_progress
    )
    metrics = result["metrics"]
    print(
        f"\npwf run finished in {time.perf_counter() - started:.0f} s\n"
        f"  top-1 {100 * metrics['cls/acc']:.2f} % with {int(metrics['ws/unique_values'])} unique "
        f"values ({100 * metrics['ws/fixed_fraction']:.0f} % of weights fixed)\n"
        f"  artifacts:  {result['artifacts']}\n"
        f"  MLflow run: {result['run_id']} in experiment '{result['experiment']}' "
        f"({result['tracking_uri']})\n"
        f"  browse:     {_browse_hint(result['tracking_uri'])}"
    )
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from flows.sweep_spec import load_sweep

    overrides = parse_override_strings(args.overrides)
    spec = load_sweep(args.sweep, overrides)
    from flows.sweep import pareto_report, pwf  # imports Prefect and Optuna: after validation

    if args.report:
        try:
            table = pareto_report(spec)
        except KeyError:
            print(
                f"pwf: no study '{spec.name}' in {spec.study.resolved_storage()} yet",
                file=sys.stderr,
            )
            return 1
        print(
            f"study '{spec.name}' ({spec.study.resolved_storage()}): {len(table)} complete trials"
        )
        print(table.to_string(index=False) if not table.empty else "(no complete trial)")
        return 0
    started = time.perf_counter()
    result = pwf(sweep=str(args.sweep), overrides=overrides)
    timing = result["timing"]
    print(
        f"\npwf sweep finished in {time.perf_counter() - started:.0f} s: "
        f"{result['complete_trials']} complete trials in study '{result['study']}'\n"
        f"  orchestration overhead: {timing['sweep/orchestration_s']:.0f} s of "
        f"{timing['sweep/wall_s']:.0f} s (training, fixing and evaluation: "
        f"{timing['sweep/compute_s']:.0f} s)\n"
        f"  MLflow parent run: {result['mlflow_run_id']}\n"
        f"  Pareto front: pwf sweep {args.sweep} --report"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "sweep":
            return sweep_command(args)
    except ConfigError as err:
        print(f"pwf: {err}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError) as err:
        print(f"pwf: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
