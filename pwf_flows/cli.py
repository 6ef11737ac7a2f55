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
import logging
import os
import signal
import sys
import time
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pwf_core._files import CheckpointError
from pwf_core.config import (
    ConfigError,
    config_to_dict,
    load_config,
    parse_override_strings,
)
from pwf_core.data import DatasetError
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
from pwf_flows.environment import configure_environment
from pwf_flows.errors import ServerError, TrackingError
from pwf_flows.infra import (
    DiskFull,
    InfraUnavailable,
    is_disk_full,
    set_infra_timeout,
)
from pwf_flows.links import LOCAL_UIS, is_server_uri, mlflow_ui
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


def _browse_hint(tracking_uri: str) -> str:
    if is_server_uri(tracking_uri):
        return f"open {mlflow_ui(tracking_uri)}"
    served = ", ".join(f"{ui.name} {ui.url()}" for ui in LOCAL_UIS)
    return f"pwf ui (serves the links above: {served})"


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

        _no_tracebacks_for_expected_failures()
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
        + f"  browse:     {_browse_hint(shown_uri(result['tracking_uri']))}"
    )
    return 0


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
    check_disk(spec.trial_config({}), spec.execution.artifacts_dir, runs=spec.n_trials)
    check_tracking_experiment(spec.name)
    from pwf_flows.server import prefect_api

    started = time.perf_counter()
    with prefect_api():
        from pwf_flows.sweep.flow import pwf  # Prefect reads the server URL now

        _no_tracebacks_for_expected_failures()
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
        f"  browse: {_browse_hint(os.environ['MLFLOW_TRACKING_URI'])}"
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


def report_command(args: argparse.Namespace) -> int:
    """``pwf report``: every problem with what it is asked for (an unknown experiment or run,
    an empty selection, a tracking URI that does not answer) ends in one line and exit 2,
    before anything is written."""
    from pwf_flows.report.collect import ReportError, Selection
    from pwf_flows.report.statistics import parse_budgets
    from pwf_flows.report.store import open_store

    budgets = parse_budgets(args.budgets)
    sweep = args.sweep
    if sweep is not None and sweep.endswith((".yaml", ".yml")):
        from pwf_flows.sweep.spec import sweep_name

        sweep = sweep_name(Path(sweep))
    selection = Selection(tuple(args.experiment), sweep, tuple(args.run), args.one_panel)
    covered = [*args.experiment, *([sweep] if sweep else []), *args.run]
    title = args.title or f"pwf report: {', '.join(covered)}"
    folder = args.out or Path("reports") / slug(covered)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"--out: '{folder}' is a file, not a folder")
    client, source = open_store(args.tracking_uri)
    from pwf_flows.report import build_report, write_report

    report = build_report(client, selection, title, source, args.reference, budgets)
    paths = write_report(report, folder)
    width = max(len(name) for name in [*paths, "open"]) + 2  # a space after the longest
    print(
        f"pwf report: {len(report.runs)} runs in "
        f"{sum(map(len, report.settings.values()))} settings, against {report.reference}\n"
        + "".join(f"  {name + ':':<{width}}{path}\n" for name, path in paths.items())
        + f"  {'open:':<{width}}file://{paths['html'].resolve()}"
    )
    return 0


# Input sides of the datasets whose images have one size, for a file whose architecture
# records none (pwf's runs record the dataset's; a spec written by hand may leave it out).
_NATIVE_SIDES = {"digits": 8, "mnist": 28, "cifar10": 32}
_EXAMPLE_BATCH = 8


def _input_side(img_size: int | None, config: dict, path: Path) -> int:
    if img_size is not None:
        return img_size
    data = config.get("data") or {}
    name = data.get("name", "digits")
    side = data.get("img_size", 224) if name == "imagefolder" else _NATIVE_SIDES.get(name)
    if side is None:
        raise CheckpointError(
            f"'{path}' records no input size; export it from Python with "
            "pwf_core.export_onnx(model, path, example_input)"
        )
    return int(side)


def export_command(args: argparse.Namespace) -> int:
    """``pwf export``: a compressed model as ONNX, run in ONNX Runtime against pwf's logits.

    A file that is not a finished compressed model of a registered or timm architecture (a
    step checkpoint, a truncated or corrupted file, one saved from the user's own class) ends
    in one line and exit 2 before anything is written.
    """
    from pwf_core.data import recorded_contract
    from pwf_core.export import load_compressed, read_header
    from pwf_core.models import ModelSpec
    from pwf_core.onnx_export import INPUT_METADATA, check_onnx, export_onnx

    out = args.out or args.file.with_suffix(".onnx")
    if out.is_dir():
        raise CheckpointError(f"--out: '{out}' is a folder; name the .onnx file to write")
    header = read_header(args.file)
    if header.get("model") is None:
        raise CheckpointError(
            f"'{args.file}' was saved from your own class {header.get('model_class')}, which "
            "pwf cannot rebuild: in Python, load it with pwf_core.load_compressed(path, "
            "model=MyNet()) and write it with pwf_core.export_onnx(model, path, example_input)"
        )
    try:
        contract = recorded_contract(header)
        if args.preprocess and contract is None:
            raise CheckpointError(
                f"'{args.file}' records no input contract (an older pwf wrote it), so there is "
                "no normalisation to put into the graph: export it without --preprocess and "
                "normalise inputs as its dataset's reader in pwf_core/data/ does"
            )
        spec = ModelSpec(**header["model"])
        model = load_compressed(args.file)
        raw, example = _example_inputs(spec, contract, header, args.file)
        result = export_onnx(model, out, example, contract=contract, preprocess=args.preprocess)
    except (ValueError, TypeError, KeyError) as err:
        # a header that parses but describes no model this pwf can load and run (including
        # NotCompressedError: free weights), said as one line rather than a traceback
        problem = f"it has no {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"'{args.file}' cannot be exported: {one_line(problem)}") from None
    difference = check_onnx(result.path, model, example, raw if args.preprocess else None)
    print(
        f"pwf export: {result.path}: {result.file_bytes:,} bytes (float ONNX "
        f"{result.float_bytes:,} bytes, {result.ratio:.1f}x smaller); "
        f"{len(result.shared_tensors)} shared tensors on {result.codebook_size} values "
        f"({result.index_dtype} indices); max |logit difference| vs pwf {difference:.2g}\n"
        + (
            f"  input: {contract.describe(args.preprocess)} (in the file's metadata, "
            f"key {INPUT_METADATA!r})"
            if contract is not None
            else "  input: not recorded (an older pwf wrote the file): normalise as its "
            "dataset's reader in pwf_core/data/ does"
        )
    )
    return 0


def _example_inputs(spec, contract, header: dict, path: Path) -> tuple:
    """Raw pixels across the contract's range and the model's input made of them (without a
    contract: values in [0, 1], the model's input as is)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if contract is not None:
        low, high = contract.raw_range
        raw = low + (high - low) * torch.rand(_EXAMPLE_BATCH, *contract.shape, generator=generator)
        return raw, contract.normalise(raw)
    side = _input_side(spec.img_size, header.get("config") or {}, path)
    example = torch.rand(_EXAMPLE_BATCH, spec.in_chans, side, side, generator=generator)
    return example, example


def slug(names: list[str]) -> str:
    """A folder name for what a report covers."""
    text = "-".join(names)[:60] or "report"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


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


def _expected(error: BaseException | None) -> bool:
    """A failure that ends in one ``pwf:`` line (and its rerun), not in a bug report."""
    expected = (KeyboardInterrupt, InfraUnavailable, DiskFull, ExperimentBusy, ConfigError)
    return error is not None and (isinstance(error, expected) or is_disk_full(error))


class _ExpectedFailureFilter(logging.Filter):
    """Prefect's engine logs a failed task or flow with its traceback; for an expected failure
    (a full disk, a server that stayed away, the experiment busy) the log line stays, the
    traceback goes: the command's last line says what happened and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _expected(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def _no_tracebacks_for_expected_failures() -> None:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _ExpectedFailureFilter) for f in handler.filters):
                handler.addFilter(_ExpectedFailureFilter())


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes, Slurm and ``kill`` send), handled like Ctrl-C: every layer
    that closes a run on an interrupt (Prefect's engine, the MLflow run, the temporary server)
    does so for this too."""


def _on_sigterm(signum: int, frame: object) -> None:
    # The shutdown that follows is not interrupted again: a scheduler's SIGKILL after its
    # grace period is what ends a shutdown that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _disk_message(err: BaseException, where: str) -> str:
    return (
        f"no space left on the disk of {where} ({one_line(str(err))}); free space there and "
        "run the same command to continue"
    )


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
        _quiet_prefect()
        print("\npwf: terminated; rerun the same command to continue", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _quiet_prefect()
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
        _quiet_prefect()
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except DiskFull as err:
        print(f"pwf: {one_line(str(err))}", file=sys.stderr)
        return DiskFull.exit_code
    except Exception as err:
        if not is_disk_full(err):
            raise
        _quiet_prefect()
        print(
            f"pwf: {_disk_message(err, args.artifacts or 'the artifacts folder')}", file=sys.stderr
        )
        return DiskFull.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
