"""Faults of a shared cluster, injected for real: a full disk (a small tmpfs), an MLflow server
stopped and restarted, PostgreSQL shut down under a sweep, SIGTERM to a run's whole process
group, two commands on one experiment, servers that are not there at the start.

Each fault ends in survival (the sweep completes with exactly ``n_trials`` complete trials,
one MLflow run per trial, nothing RUNNING, no metric logged twice) or in one ``pwf:`` line and
an exit code after which the same command repairs everything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pwf_core.config import load_config
from pwf_flows.artifacts import ExperimentFiles
from tests._dummies.mlflow_store import copy_empty_store
from tests._dummies.services import (
    Services,
    exited,
    free_port,
    mlflow_server_argv,
    silent_listener,
    temporary_server,
    wait_until,
    with_default_signals,
)
from tests.conftest import DEFAULT_CONFIG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {
    "pretrain": {"epochs": 3},
    "train": {"epochs": 0.5},
    "compression": {"schedule": [0.4, 0.8, 1.0]},
    "eval": {"mc_samples": 2},
}
TINY_TRIAL = {
    "pretrain.epochs": 2,
    "train.epochs": 0.2,
    "compression.schedule": [0.5, 1.0],
    "eval.mc_samples": 0,
}


def write_config(path: Path, name: str, **sections) -> Path:
    values = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for section, fields in {**SMALL, **sections}.items():
        values.setdefault(section, {}).update(fields)
    values["name"] = name
    path.write_text(yaml.safe_dump(values))
    return path


def write_sweep(path: Path, name: str, storage: str, artifacts: Path, **execution) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "base": str(DEFAULT_CONFIG),
                "overrides": TINY_TRIAL,
                "space": {"compression.b": {"int": [4, 6]}},
                "study": {"n_trials": 3, "storage": storage, "heartbeat_s": 2},
                "execution": {"artifacts_dir": str(artifacts), **execution},
            }
        )
    )
    return path


def pwf_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pwf_flows.cli", *argv, "--no-progress"]


def run(argv: list[str], cwd: Path, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """A command to its end (a hang guard, not a time limit), its output kept."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start(argv: list[str], cwd: Path, env: dict, log: Path, **kwargs) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            with_default_signals(argv),
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            **kwargs,
        )


def finish(process: subprocess.Popen, log: Path, timeout: float = 400) -> str:
    process.wait(timeout=timeout)
    return log.read_text()


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def wait_while_running(condition, process: subprocess.Popen, what: str, timeout: float = 300):
    """Wait (closely: a fault is injected the moment it holds) while ``process`` runs."""
    wait_until(condition, what, timeout, poll=0.02, processes=[process])


# The compressed file's header holds the experiment's config, name included, so its byte count
# differs between experiments of other names; every other final number must be equal.
NAMED = (
    "size/file_bytes",
    "size/compression_ratio",
    "size/header_bytes",
    "size/fixed_length_bytes",
    "size/fixed_length_ratio",
    "size/bound_ratio",
)


def summary_metrics(files: ExperimentFiles) -> dict:
    metrics = json.loads(files.summary.read_text())["metrics"]
    return {key: value for key, value in metrics.items() if key not in NAMED}


def assert_one_clean_run(tracking_uri: str, experiment: str) -> None:
    """One FINISHED run in ``experiment``, each round logged exactly once."""
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "cls/acc")]
    assert sorted(steps) == [1, 2, 3]


def assert_sweep_intact(tracking_uri: str, name: str, study: optuna.Study, n: int) -> None:
    """Exactly ``n`` complete trials, one FINISHED MLflow run for each under one FINISHED
    parent, names and tags matching the trial numbers, no metric step logged twice."""
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == n
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    by_run = {t.user_attrs["mlflow_run_id"]: t.number for t in complete}
    assert sorted(r.info.run_id for r in children) == sorted(by_run)
    for child in children:
        number = by_run[child.info.run_id]
        assert child.data.tags["sweep.trial"] == str(number)
        assert child.info.run_name.endswith(f" (trial {number})")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "cls/acc")]
        assert len(steps) == len(set(steps)), f"trial {number} logged a round twice"


@pytest.fixture
def env(prefect_server, tmp_path, empty_mlflow_db) -> dict:
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": copy_empty_store(empty_mlflow_db, tmp_path),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_server, empty_mlflow_db) -> dict:
    """The uninterrupted run's final metrics, to compare a repaired run with."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "config.yaml", "reference")
    environment = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "MLFLOW_TRACKING_URI": copy_empty_store(empty_mlflow_db, tmp),
    }
    done = run(pwf_command("run", str(config), "--artifacts", str(tmp / "a")), tmp, environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return summary_metrics(ExperimentFiles.for_config(load_config(config), tmp / "a"))


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path``: a disk that really fills up."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left."""
    filler = disk / "filler"
    # Unbuffered: a buffered file would still hold bytes when it is closed, and closing it
    # would fail with the very ENOSPC the loop stops at.
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.mark.timeout(900)
@pytest.mark.parametrize("when", ["mid-round", "evaluate"])
def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_finishes_it(
    when, env, tmp_path, reference
):
    """The disk fills up (another job on the shared disk) after round 1, or once every round is
    done and the final evaluation writes its model and plots."""
    config = write_config(tmp_path / "config.yaml", f"full-{when}")
    with small_disk(tmp_path / "disk", "8m") as disk:
        artifacts = disk / "artifacts"
        files = ExperimentFiles.for_config(load_config(config), artifacts)
        trigger = files.step(0) if when == "mid-round" else files.step(2)
        command = pwf_command("run", str(config), "--artifacts", str(artifacts))
        log = tmp_path / "first.log"
        process = start(command, tmp_path, env, log)
        wait_while_running(trigger.is_file, process, trigger.name)
        process.send_signal(signal.SIGSTOP)  # hold it while the disk fills
        filler = fill(disk)
        process.send_signal(signal.SIGCONT)
        output = finish(process, log)
        assert process.returncode == 6, output[-3000:]
        line = last_line(output)
        assert line.startswith("pwf: no space left") and "run the same command to continue" in line
        assert "Traceback" not in output
        assert not files.summary.is_file()
        filler.unlink()
        again = run(command, tmp_path, env)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert summary_metrics(files) == reference  # the same numbers as an uninterrupted run
    assert_one_clean_run(env["MLFLOW_TRACKING_URI"], f"full-{when}")


@pytest.mark.timeout(300)
def test_a_disk_too_small_for_the_run_is_refused_before_it_starts(env, tmp_path):
    store = tmp_path / "untouched.db"  # not the fixture's copied store: none may be created
    env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    config = write_config(tmp_path / "config.yaml", "too-small")
    with small_disk(tmp_path / "disk", "1m") as disk:
        command = pwf_command("run", str(config), "--artifacts", str(disk / "artifacts"))
        done = run(command, tmp_path, env)
        assert done.returncode == 6, done.stdout[-2000:] + done.stderr[-2000:]
        line = last_line(done.stderr)
        assert line.startswith("pwf: the run needs about") and "is free there" in line
        assert not (disk / "artifacts").exists()
    assert not store.exists()


@pytest.mark.timeout(600)
def test_a_second_run_of_a_running_experiment_is_refused_and_the_first_is_untouched(env, tmp_path):
    config = write_config(tmp_path / "config.yaml", "twice", pretrain={"epochs": 12})
    files = ExperimentFiles.for_config(load_config(config), tmp_path / "a")
    command = pwf_command("run", str(config), "--artifacts", str(tmp_path / "a"))
    first_log = tmp_path / "first.log"
    first = start(command, tmp_path, env, first_log)
    wait_while_running((files.root / "run.owner").is_file, first, "the first run's lock")
    first.send_signal(signal.SIGSTOP)  # it must still be running when the second one asks
    try:
        second = run(command, tmp_path, env)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    line = last_line(second.stderr)
    assert line.startswith("pwf: experiment 'twice'") and f"process {first.pid} on" in line
    output = finish(first, first_log)
    assert first.returncode == 0, output[-3000:]
    assert_one_clean_run(env["MLFLOW_TRACKING_URI"], "twice")  # no metric logged twice


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["process-group-and-server", "pwf-alone"])
def test_sigterm_is_handled_like_ctrl_c(target, tmp_path, empty_mlflow_db):
    """With the temporary Prefect server (no PREFECT_API_URL): the signal a scheduler sends."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment |= {
        "MLFLOW_TRACKING_URI": copy_empty_store(empty_mlflow_db, tmp_path),
        "PREFECT_HOME": str(tmp_path / ".prefect"),
    }
    config = write_config(tmp_path / "config.yaml", "sigterm", pretrain={"epochs": 200})
    command = pwf_command("run", str(config), "--artifacts", str(tmp_path / "a"))
    log = tmp_path / "run.log"
    process = start(command, tmp_path, environment, log, start_new_session=True)
    files = ExperimentFiles.for_config(load_config(config), tmp_path / "a")
    wait_while_running((files.root / "run.owner").is_file, process, "the run", timeout=300)
    time.sleep(3)  # inside pretraining
    server = temporary_server(process.pid)
    assert server is not None
    if target == "pwf-alone":
        process.send_signal(signal.SIGTERM)
    else:  # every process of the job: the command's group and the server's session
        os.killpg(process.pid, signal.SIGTERM)
        server.send_signal(signal.SIGTERM)
    output = finish(process, log, timeout=60)  # a hang guard; the time it takes: benchmarks/
    assert process.returncode == 143, output[-3000:]
    assert last_line(output) == "pwf: terminated; rerun the same command to continue"
    assert "Traceback" not in output and "Error logging to API" not in output
    client = MlflowClient(environment["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert run.info.status == "KILLED"
    wait_until(lambda: exited(server), "the temporary Prefect server to stop", timeout=20)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["nobody-listens", "silent"])
def test_servers_that_do_not_answer_at_the_start_end_in_one_line_each(how, env, tmp_path):
    """Started together: MLflow, Prefect and the study database at ports nobody listens on, or
    where a listener accepts the connection and never answers. Each is named (password
    masked) within the start budget of the command's checks."""
    with contextlib.ExitStack() as stack:
        port = free_port() if how == "nobody-listens" else stack.enter_context(silent_listener())
        _servers_fail_at_the_start(port, env, tmp_path)


def _servers_fail_at_the_start(port: int, env: dict, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", "nobody")
    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        "nobody",
        f"postgresql://pwf:s3cret@127.0.0.1:{port}/optuna",
        tmp_path / "sweep-artifacts",
    )
    cases = {
        "mlflow": (
            pwf_command("run", str(config), "--artifacts", str(tmp_path / "a1")),
            {"MLFLOW_TRACKING_URI": f"http://pwf:s3cret@127.0.0.1:{port}"},
            3,
            f"the MLflow tracking server http://pwf:***@127.0.0.1:{port}",
        ),
        "prefect": (
            pwf_command("run", str(config), "--artifacts", str(tmp_path / "a2")),
            {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
            4,
            f"the Prefect API http://127.0.0.1:{port}/api",
        ),
        "study": (
            pwf_command("sweep", str(sweep)),
            {},
            5,
            f"the study database postgresql://pwf:***@127.0.0.1:{port}/optuna",
        ),
    }
    running = {
        name: subprocess.Popen(
            argv,
            cwd=tmp_path,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (argv, extra, _, _) in cases.items()
    }
    for name, process in running.items():
        out, err = process.communicate(timeout=200)
        _, _, code, service = cases[name]
        assert process.returncode == code, f"{name}: {out[-2000:]}{err[-2000:]}"
        line = last_line(err)
        assert line.startswith("pwf: ") and service in line, line
        assert "Traceback" not in err and "s3cret" not in err + out
    assert not (tmp_path / "a1").exists() and not (tmp_path / "a2").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server (SQLite backend) that a test can stop and start again."""
    services = Services(tmp_path)
    port = free_port()
    argv = mlflow_server_argv(port, f"sqlite:///{tmp_path / 'mlflow-server.db'}")
    url = f"http://127.0.0.1:{port}"

    def up() -> None:
        services.start("mlflow", argv)
        services.wait_http(f"{url}/health", "the MLflow server")

    def down() -> None:
        services.stop("mlflow")

    up()
    try:
        yield url, up, down
    finally:
        services.stop_all()


def complete_trials(storage: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0
    return len(study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.timeout(900)
def test_mlflow_outages_pause_the_sweep_and_a_long_one_stops_it_for_a_rerun(
    env, tmp_path, mlflow_server
):
    url, up, down = mlflow_server
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = write_sweep(
        tmp_path / "sweep.yaml", "outage", storage, tmp_path / "a", infra_timeout_s=40
    )
    environment = {**env, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    command = pwf_command("sweep", str(sweep))
    log = tmp_path / "first.log"
    process = start(command, tmp_path, environment, log)
    wait_while_running(lambda: complete_trials(storage, "outage") >= 1, process, "a complete trial")
    down()  # an outage the sweep meets (the server takes 7-15 s to start): waited out
    unreachable = f"pwf: MLflow at {url} is unreachable"
    wait_while_running(lambda: unreachable in log.read_text(), process, "the outage to be met")
    up()
    wait_while_running(lambda: complete_trials(storage, "outage") >= 2, process, "a second trial")
    down()  # an outage longer than the sweep's 40 s budget (the default is 600 s)
    output = finish(process, log, timeout=200)
    assert process.returncode == 3, output[-3000:]
    # each outage said once, by pwf, and the libraries' retry narration quiet
    assert output.count(unreachable) == 2, output[-3000:]
    assert output.count(f"pwf: MLflow at {url} is back after") == 1, output[-3000:]
    assert "Retrying (Retry(" not in output
    line = last_line(output)
    assert line.startswith("pwf: MLflow at " + url) and "rerun the same command" in line
    study = optuna.load_study(study_name="outage", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert not study.get_trials(states=(TrialState.RUNNING,))
    (queued,) = study.get_trials(states=(TrialState.WAITING,))  # the same settings, again
    (given_up,) = study.get_trials(states=(TrialState.FAIL,))
    assert queued.params == given_up.params
    up()
    again = run(command, tmp_path, environment)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = optuna.load_study(study_name="outage", storage=storage)
    assert_sweep_intact(url, "outage", study, 3)


@pytest.mark.timeout(900)
def test_postgres_shut_down_at_the_end_of_a_trial_pauses_the_sweep(env, tmp_path, postgres):
    database = f"outage_{tmp_path.name[-12:].replace('-', '_')}"
    storage = postgres.create_database(database)
    sweep = write_sweep(tmp_path / "sweep.yaml", "pg-outage", storage, tmp_path / "a")
    command = pwf_command("sweep", str(sweep))
    log = tmp_path / "first.log"
    process = start(command, tmp_path, env, log)
    summaries = tmp_path / "a" / "experiments" / "pg-outage"
    wait_while_running(
        lambda: any(summaries.glob("*/final/summary.json")), process, "a finished trial"
    )
    process.send_signal(signal.SIGSTOP)  # before it tells Optuna
    postgres.stop()
    process.send_signal(signal.SIGCONT)
    try:
        time.sleep(15)
    finally:
        postgres.start()
    output = finish(process, log, timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert "invalid data in the commit" not in output  # Optuna's guess, not what happened
    assert output.count("is unreachable") == output.count("is back after") <= 1, output[-3000:]
    study = optuna.load_study(study_name="pg-outage", storage=storage)
    assert not study.get_trials(states=(TrialState.FAIL,))  # an outage is not a trial result
    assert_sweep_intact(env["MLFLOW_TRACKING_URI"], "pg-outage", study, 3)
