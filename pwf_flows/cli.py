"""The ``pwf`` command.

``pwf run [CONFIG]`` runs the ``pwf-experiment`` flow (the shipped default config when CONFIG
is omitted); ``pwf sweep SWEEP.yaml`` runs the ``pwf`` sweep flow with in-process trials, and
``--report`` prints its trials and Pareto front. Without ``PREFECT_API_URL`` a temporary Prefect
server runs for the length of the command. ``pwf report`` compares finished runs; ``pwf export
FILE`` writes a compressed model as ONNX and checks it in ONNX Runtime; ``pwf ui`` serves the
local stores in MLflow, the Prefect UI and optuna-dashboard (:mod:`pwf_flows.ui`).

Everything that can be checked is checked before Prefect starts, before an MLflow run exists
and before the artifacts folder is written: the config or sweep file, the dataset files, the
weights, the device, that the model runs on the data, that the servers answer and that the
disk has room. Bad input ends in one ``pwf: ...`` line and exit code 2; a service that stays
away, or a full disk, in one line and an exit code of its own (:mod:`pwf_flows.infra`); Ctrl-C
and SIGTERM in one line and exit codes 130 and 143, with the MLflow run marked KILLED. After any
of these the same command continues where the run stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pwf_core.data import DatasetError
from pwf_core.errors import CheckpointError, ConfigError
from pwf_flows.commands.export import export_command
from pwf_flows.commands.failures import Terminated, disk_message, one_line, quiet_prefect
from pwf_flows.commands.report import report_command
from pwf_flows.commands.run import run_command
from pwf_flows.commands.sweep import sweep_command
from pwf_flows.environment import configure_environment
from pwf_flows.errors import ServerError, TrackingError
from pwf_flows.infra import DiskFull, InfraUnavailable, is_disk_full
from pwf_flows.process_exit import end_quickly
from pwf_flows.run_lock import ExperimentBusy
from pwf_flows.ui import add_parser as add_ui_parser
from pwf_flows.ui import ui_command

# The embedded default experiment ships inside the package (an installed wheel has no
# checkout to find it in); configs/default.yaml in the repository is the same file.
DEFAULT_CONFIG = Path(str(resources.files("pwf_flows.configs") / "default.yaml"))


EXIT_BAD_INPUT = 2

EXIT_INTERRUPTED = 130

EXIT_TERMINATED = 143


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
        help="experiment YAML (default: the embedded configs/default.yaml)",
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
        "--replicates",
        type=int,
        default=1,
        metavar="N",
        help="run the experiment under N seeds (replicate.index 0 to N-1, one pretrained model "
        "shared) and summarise them: mean, std and 95 %% interval",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over even if this experiment finished (its MLflow run is kept)",
    )
    run.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every step's checkpoint (default: the newest, all a resume needs)",
    )
    sweep = commands.add_parser("sweep", help="run or continue an Optuna sweep (the pwf flow)")
    sweep.add_argument("sweep", type=Path, help="sweep YAML, e.g. sweeps/full-sweep.yaml")
    _add_common(sweep, "a sweep field, e.g. --set study.n_trials=4")
    sweep.add_argument(
        "--report",
        action="store_true",
        help="print the study's trials and Pareto front, run nothing",
    )
    sweep.add_argument(
        "--replay",
        action="store_true",
        help="apply the sweep's early-stopping rule (study.early_stopping, or the default one) "
        "to the study's recorded rounds: which trials it would have stopped, the compute it "
        "would have saved, whether the Pareto front would have lost a trial; run nothing",
    )
    report = commands.add_parser(
        "report", help="compare finished runs: HTML page, figures and tables from MLflow"
    )
    report.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="every finished run of this MLflow experiment (repeatable)",
    )
    report.add_argument(
        "--sweep", metavar="NAME_OR_FILE", help="a sweep's trials (its name, or its YAML file)"
    )
    report.add_argument(
        "--run", action="append", default=[], metavar="ID", help="one run (repeatable)"
    )
    report.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="where the runs are (default: MLFLOW_TRACKING_URI, else ./mlruns.db)",
    )
    report.add_argument("--out", type=Path, help="folder for the report (default: reports/NAME)")
    report.add_argument("--title", help="the page's title (default: what it covers)")
    report.add_argument(
        "--one-panel", action="store_true", help="all runs in one panel (one dataset only)"
    )
    report.add_argument(
        "--reference",
        metavar="METHOD",
        help="the method the others are compared against (default: the first by name)",
    )
    report.add_argument(
        "--budgets",
        metavar="K,K,...",
        default="8,16,32,64",
        help="compare methods at these counts of shared values at most (default: 8,16,32,64)",
    )
    export = commands.add_parser(
        "export", help="write a compressed model as ONNX (codebook + indices) and check it"
    )
    export.add_argument(
        "file", type=Path, help="a compressed model, e.g. a run's final/model.pwf.safetensors"
    )
    export.add_argument("--out", type=Path, help="the ONNX file (default: FILE with .onnx)")
    export.add_argument(
        "--preprocess",
        action="store_true",
        help="put the dataset's normalisation into the graph: the file takes raw pixels",
    )
    add_ui_parser(commands)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    # The shutdown that follows is not interrupted again: a scheduler's SIGKILL after its
    # grace period is what ends a shutdown that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    configure_environment()  # offline defaults, before Prefect or MLflow is imported
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "run":
            return run_command(args, argv)
        if args.command == "report":
            return report_command(args)
        if args.command == "export":
            return export_command(args)
        if args.command == "ui":
            return ui_command(args)
        return sweep_command(args)
    except Terminated:
        quiet_prefect()
        print("\npwf: terminated; rerun the same command to continue", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        quiet_prefect()
        print("\npwf: interrupted; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        ConfigError,
        DatasetError,
        CheckpointError,
        TrackingError,
        ServerError,
        ExperimentBusy,
    ) as err:
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InfraUnavailable as err:
        quiet_prefect()
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except DiskFull as err:
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return DiskFull.exit_code
    except Exception as err:
        if not is_disk_full(err):
            raise
        quiet_prefect()
        print(
            f"pwf: {disk_message(err, args.artifacts or 'the artifacts folder')}", file=sys.stderr
        )
        return DiskFull.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)


def console_main() -> int:
    """The ``pwf`` command as a process of its own (the console script, ``python -m``)."""
    end_quickly()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
