"""``pwf ui``: MLflow, the Prefect UI and optuna-dashboard on the local stores, until stopped.

A local run records into ``mlruns.db`` (MLflow), ``.prefect/`` (``PREFECT_HOME``: the
temporary Prefect server's database) and ``optuna.db`` (a sweep's study) in the working
directory. This command serves the three, each on 127.0.0.1 at the port every link pwf stores
names (:mod:`pwf_flows.links`), and stops all three on Ctrl-C or SIGTERM. A store that
``MLFLOW_TRACKING_URI`` or ``PREFECT_API_URL`` puts on a server is that server's to show.

Each UI runs in a process group of its own (a session), so stopping its group stops the
workers it started; each dies with this command too (the parent-death signal), should it be
killed outright. A fresh store is created by its UI while the lock pwf's other commands take
to create it is held, so a ``pwf run`` started at the same moment waits instead of racing it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pwf_core._files import file_lock
from pwf_core.errors import ConfigError
from pwf_flows.links import (
    HOST,
    MLFLOW_UI,
    OPTUNA_UI,
    PREFECT_UI,
    LocalUI,
    is_server_uri,
    mlflow_ui,
)
from pwf_flows.server import answers, die_with_parent

START_TIMEOUT_S = 180.0  # a first start on a fresh PREFECT_HOME migrates its database
STOP_TIMEOUT_S = 10.0  # then SIGKILL
LOGS = ".pwf-ui"


class UIError(ConfigError):
    """A UI cannot be served here: its port is taken, or it exited before it answered."""


@dataclass
class Service:
    """One UI: what runs it, where it answers, the store it shows.

    Args:
        ui: Its name and port.
        argv: The command.
        health: The address that answers 200 once it serves.
        store: What it shows, as the user reads it.
        lock: Held from its start until it answers (the store's creation lock).
        env: Its environment.
        prepare: Run under ``lock`` before it starts (creates a store it cannot create).
    """

    ui: LocalUI
    argv: list[str]
    health: str
    store: str
    lock: Path | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    prepare: Callable[[], object] | None = None
    process: subprocess.Popen | None = None
    log: IO[bytes] | None = None


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``pwf ui`` subcommand and its options."""
    parser = commands.add_parser(
        "ui",
        help="serve the local MLflow store, Prefect runs and Optuna study until Ctrl-C",
        description=(
            "MLflow on mlruns.db, the Prefect UI on .prefect/ (PREFECT_HOME) and "
            "optuna-dashboard on optuna.db, each on 127.0.0.1 at the port every link pwf "
            "stores names; Ctrl-C or SIGTERM stops all three."
        ),
    )
    for ui in (MLFLOW_UI, PREFECT_UI, OPTUNA_UI):
        parser.add_argument(
            ui.flag,
            type=int,
            metavar="PORT",
            help=f"{ui.name}'s port (default: {ui.env}, else {ui.default_port})",
        )
    parser.add_argument(
        "--mlflow-store",
        metavar="URI",
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else ./mlruns.db)",
    )
    parser.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="the Optuna storage (default: ./optuna.db, where sweeps keep their studies)",
    )


def _port(ui: LocalUI, given: int | None) -> int:
    """The port from the option, else the environment, else the default; exported so that
    the links this process makes name it too."""
    if given is not None:
        if not 0 < given < 65536:
            raise UIError(f"{ui.flag} {given}: a port is a number from 1 to 65535")
        os.environ[ui.env] = str(given)
    port = ui.port()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind((HOST, port))
        except OSError:
            raise UIError(
                f"port {port} ({ui.name}) is in use on {HOST}: stop what listens there (an "
                f"earlier pwf ui?) or choose another port with {ui.flag} or {ui.env}"
            ) from None
    return port


def _mlflow(store: str, port: int, workdir: Path) -> Service:
    from pwf_flows.tracking import shown_uri

    return Service(
        MLFLOW_UI,
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store,
            # where pwf's runs keep their artifacts (a run records the absolute path; new
            # experiments made in the UI land beside them)
            "--default-artifact-root",
            str(workdir / "mlruns"),
            "--no-serve-artifacts",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        f"http://{HOST}:{port}/health",
        shown_uri(store),
        _sqlite_lock(store),
        # MLflow's job runner (GenAI scorers: seven more processes) has nothing to do for
        # a viewer of training runs
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
    )


def _prefect(home: Path, port: int) -> Service:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the address the UI's pages call (derived from these settings, not from --port)
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
    }
    return Service(
        PREFECT_UI,
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(port),
            # a viewer: no scheduler or late-run marking on the runs it shows
            "--no-services",
            "--analytics-off",
        ],
        f"http://{HOST}:{port}/api/health",
        str(home),
        home / "server-start.lock",  # what pwf's temporary server takes to start
        env,
    )


def _optuna(storage: str, port: int) -> Service:
    from pwf_flows.sweep.spec import expand_storage, masked_url

    url = expand_storage(storage)
    return Service(
        OPTUNA_UI,
        [
            sys.executable,
            "-m",
            "optuna_dashboard._cli",  # what the optuna-dashboard command runs, in this Python
            url,
            "--host",
            HOST,
            "--port",
            str(port),
            "--server",
            "wsgiref",
            "--quiet",
        ],
        f"http://{HOST}:{port}/api/meta",
        masked_url(storage),
        _sqlite_lock(url),
        # optuna-dashboard opens a storage without creating its tables; a sweep started
        # later finds the same (empty) study database it would have created
        prepare=lambda: _optuna_tables(url),
    )


def _optuna_tables(url: str) -> None:
    import optuna

    optuna.storages.RDBStorage(url).remove_session()


def _sqlite_lock(uri: str) -> Path | None:
    """The lock pwf takes while it creates a SQLite store's tables (None: not SQLite)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).with_suffix(".lock") if database else None


def _tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:]) or "(nothing logged)"


def _start(service: Service, logs: Path) -> None:
    parent = os.getpid()
    service.log = open(logs / f"{service.ui.name}.log", "ab")  # noqa: SIM115 (lives with it)
    service.process = subprocess.Popen(
        service.argv,
        env=service.env,
        stdin=subprocess.DEVNULL,
        stdout=service.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),
    )


def _wait_ready(services: list[Service], logs: Path) -> None:
    """Until every UI answers.

    Raises:
        UIError: naming the UI that exited first or did not answer in time, with its log.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = list(services)
    while waiting:
        for service in list(waiting):
            if answers(service.health):
                waiting.remove(service)
            elif service.process.poll() is not None:
                log = logs / f"{service.ui.name}.log"
                raise UIError(
                    f"{service.ui.name} exited ({service.process.returncode}) before it "
                    f"answered: {_tail(log)} (log: {log})"
                )
        if waiting and time.monotonic() > deadline:
            names = ", ".join(s.ui.name for s in waiting)
            raise UIError(f"{names} did not answer within {START_TIMEOUT_S:.0f} s (logs: {logs})")
        time.sleep(0.3)


@contextlib.contextmanager
def serving(services: list[Service], logs: Path) -> Iterator[None]:
    """Start every UI, yield once all answer, and stop them all however the block ends."""
    logs.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as locks:
            for service in services:
                if service.lock is not None:
                    locks.enter_context(file_lock(service.lock))
                if service.prepare is not None:
                    service.prepare()
                _start(service, logs)
            _wait_ready(services, logs)
        yield
    finally:
        stop(services)


def stop(services: list[Service]) -> None:
    """SIGTERM every UI's process group; SIGKILL what is left of a group after
    :data:`STOP_TIMEOUT_S`."""
    started = [s for s in services if s.process is not None]
    for service in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for service in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        while _group_alive(service.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)  # its workers, still stopping
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait()
        service.log.close()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def plan(args: argparse.Namespace, workdir: Path) -> tuple[list[Service], list[str]]:
    """The UIs to start, and a line for each store that a server shows instead.

    Raises:
        UIError: when a port is taken or not a port.
    """
    services: list[Service] = []
    elsewhere: list[str] = []
    store = args.mlflow_store or os.environ["MLFLOW_TRACKING_URI"]
    if is_server_uri(store):
        elsewhere.append(f"MLflow: the runs are on the server {mlflow_ui(store)}")
    else:
        services.append(_mlflow(store, _port(MLFLOW_UI, args.mlflow_port), workdir))
    api = os.environ.get("PREFECT_API_URL")
    if api:
        elsewhere.append(f"Prefect: the runs are on the server at {api.removesuffix('/api')}")
    else:
        home = Path(os.environ["PREFECT_HOME"]).resolve()
        services.append(_prefect(home, _port(PREFECT_UI, args.prefect_port)))
    storage = args.optuna_storage or f"sqlite:///{workdir / 'optuna.db'}"
    services.append(_optuna(storage, _port(OPTUNA_UI, args.optuna_port)))
    return services, elsewhere


def ui_command(args: argparse.Namespace) -> int:
    """Serve the local stores until Ctrl-C or SIGTERM; 0 once every UI has stopped."""
    workdir = Path.cwd().resolve()
    services, elsewhere = plan(args, workdir)
    logs = workdir / LOGS
    width = max(len(s.ui.name) for s in services) + 2
    try:
        with serving(services, logs):
            print(
                f"pwf ui: the runs recorded in {workdir} (Ctrl-C stops every UI)\n"
                + "".join(
                    f"  {s.ui.name + ':':<{width}}{s.ui.url()}  ({s.store})\n" for s in services
                )
                + "".join(f"  {line}\n" for line in elsewhere)
                + f"  {'logs:':<{width}}{logs}",
                flush=True,
            )
            while all(s.process.poll() is None for s in services):
                time.sleep(0.5)
            gone = next(s for s in services if s.process.poll() is not None)
            raise UIError(
                f"{gone.ui.name} exited ({gone.process.returncode}): "
                f"{_tail(logs / f'{gone.ui.name}.log')}; the other UIs were stopped"
            )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the command turns it into one)
        print("pwf ui: stopped", flush=True)
        return 0
