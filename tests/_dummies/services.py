"""Real servers and workers as background processes for tests: started, watched and stopped.

Each process runs in a session of its own, so stopping it stops what it started too (a
worker's flow runs, a server's workers); stopping is the documented way (SIGTERM, or SIGINT
twice for a Prefect worker) with SIGKILL after a timeout, and every wait is bounded. The
benchmarks use the same class, so its failures raise ``AssertionError`` explicitly (a script
may run under ``python -O``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from pwf_flows.server import free_port

__all__ = [
    "FINAL_STATES",
    "WORKER_INTERRUPTS",
    "Service",
    "Services",
    "answers",
    "exited",
    "flow_run_id",
    "free_port",
    "mlflow_server_argv",
    "prefect_server_argv",
    "request",
    "rest",
    "silent_listener",
    "temporary_server",
    "wait_until",
    "with_default_signals",
]

VENV_BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_server_exports() -> dict[str, str]:
    """The variables the README's ``export PREFECT_SERVER_ANALYTICS_ENABLED=...`` line sets."""
    for line in README.read_text().splitlines():
        if line.startswith("export PREFECT_SERVER_ANALYTICS_ENABLED"):
            return dict(word.split("=", 1) for word in shlex.split(line)[1:])
    raise AssertionError("README no longer shows its servers' export line")


# The servers' telemetry and MLflow's job runner off, as the README's first server line has it.
QUIET_ENV = _readme_server_exports()
# A Prefect worker ignores one SIGTERM; the first SIGINT starts its shutdown, the second ends it.
WORKER_INTERRUPTS = 2
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
# A command started from a script in the background (``cmd &``) inherits SIGINT ignored, as
# POSIX prescribes, and an ignored signal stays ignored through exec: a test that signals a
# child sets the child's dispositions itself rather than depend on how pytest was started.
_DEFAULT_SIGNALS = """import os, signal, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(number, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
os.execvp(sys.argv[1], sys.argv[1:])
"""


def with_default_signals(argv: list[str]) -> list[str]:
    """``argv`` run with SIGINT, SIGTERM, SIGHUP and SIGQUIT at their defaults and none
    blocked, whatever this process ignores (the command replaces the launcher: same pid).

    Args:
        argv: The command.
    """
    return [sys.executable, "-c", _DEFAULT_SIGNALS, *argv]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts every connection and never says a word: a server that
    hangs (stopped, overloaded, behind a black-holing proxy). Yields the port.
    """
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


def request(
    url: str,
    body: dict | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """Status and body (JSON when it parses, else text) of a GET or, with ``body``, a POST.

    An HTTP error status is returned like any other; a server that does not answer raises
    ``OSError``.

    Args:
        url: The full address.
        body: Sent as JSON in a POST; None makes it a GET.
        headers: Sent besides ``Content-Type: application/json`` (``Authorization``, ``Host``).
        timeout: Seconds to wait for the answer.
    """
    sent = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:  # MLflow's /health says OK
        return status, text


def rest(url: str, body: dict | None = None, headers: Mapping[str, str] | None = None) -> Any:
    """The JSON answer of a REST call that must succeed (Prefect's or MLflow's API).

    Args:
        url: The endpoint's full address.
        body: POSTed as JSON; None makes it a GET.
        headers: Extra request headers.
    """
    status, answer = request(url, body, headers)
    if status != 200:
        raise AssertionError(f"{url} answered {status}: {str(answer)[:2000]}")
    return answer


def answers(url: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``url`` answers 200 right now.

    Args:
        url: The address to GET.
        headers: Extra request headers.
    """
    try:
        return request(url, headers=headers, timeout=2)[0] == 200
    except OSError:  # not listening (yet)
        return False


def wait_until(
    condition: Callable[[], bool],
    what: str | Callable[[], str],
    timeout: float = 240,
    poll: float = 0.3,
    processes: Collection[subprocess.Popen] = (),
) -> None:
    """Wait until ``condition()``; fail early when one of ``processes`` exited, late when the
    wait timed out.

    Args:
        condition: Checked every ``poll`` seconds.
        what: What is awaited, for the failure (a callable: described only then).
        timeout: Seconds to wait at most.
        poll: Seconds between checks.
        processes: Commands that must still run while the wait lasts.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(
                    f"the command exited with {process.returncode} before {_describe(what)}"
                )
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {_describe(what)}")
        time.sleep(poll)


def exited(process: psutil.Process) -> bool:
    """Whether ``process`` is gone (a zombie no one reaped yet counts as gone)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def temporary_server(pid: int) -> psutil.Process | None:
    """The temporary Prefect server (uvicorn) the ``pwf`` command ``pid`` started, if any."""
    for child in _descendants(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("uvicorn" in part for part in child.cmdline()):
                return child
    return None


def flow_run_id(output: str) -> str:
    """The flow run's id in the output of ``prefect deployment run``.

    Args:
        output: What the command printed.
    """
    return next(line.split()[-1] for line in output.splitlines() if "UUID" in line)


@dataclass
class Service:
    """One background process and its log."""

    name: str
    process: subprocess.Popen
    log: Path
    interrupts: int = 0  # SIGINTs that stop it; 0: SIGTERM does

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        """The end of its log.

        Args:
            chars: How many characters at most.
        """
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


@dataclass
class Services:
    """Background processes started in ``workdir`` with ``env``; :meth:`stop_all` at the end.

    Args:
        workdir: Where they run and write ``<name>.log``.
        env: Set for every process, over this process's environment, the venv's ``bin`` first
            on ``PATH``, the servers' telemetry and MLflow's job runner off (as the README's
            and compose's servers run); ``PREFECT_API_URL`` and
            ``MLFLOW_TRACKING_URI`` here are what :meth:`prefect_api` and :meth:`mlflow_api`
            call.
        unset: Variables of this process's environment that no process gets.
    """

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    unset: Collection[str] = ()
    running: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        inherited = {k: v for k, v in os.environ.items() if k not in self.unset}
        self.env = {
            **inherited,
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            **QUIET_ENV,
            **self.env,
        }

    def start(
        self,
        name: str,
        argv: list[str],
        cwd: Path | None = None,
        interrupts: int = 0,
        **env: str,
    ) -> Service:
        """Start ``argv`` in its own session, its output appended to ``<workdir>/<name>.log``.

        Args:
            name: The service's name, unique among those running.
            argv: The command.
            cwd: Where it runs (the workdir if None).
            interrupts: Stop it with this many SIGINTs (0: with SIGTERM).
            **env: Variables for this process only.
        """
        log = self.workdir / f"{name}.log"
        with log.open("a") as handle:
            process = subprocess.Popen(
                with_default_signals(argv),
                cwd=cwd or self.workdir,
                env={**self.env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, process, log, interrupts)
        self.running[name] = service
        return service

    def worker(self, name: str, pool: str, limit: int | None = None, **env: str) -> Service:
        """Start a Prefect worker on work pool ``pool``, stopped with two SIGINTs.

        Args:
            name: The service's name.
            pool: The work pool it polls.
            limit: How many flow runs it runs at once (``--limit``; None: no limit).
            **env: Variables for the worker and the flow runs it starts.
        """
        argv = ["prefect", "worker", "start", "--pool", pool]
        if limit is not None:
            argv += ["--limit", str(limit)]
        return self.start(name, argv, interrupts=WORKER_INTERRUPTS, **env)

    def run(
        self, argv: list[str], cwd: Path | None = None, timeout: float = 180, **env: str
    ) -> str:
        """Run ``argv`` to its end and return its output; fail with the output if it fails.

        Args:
            argv: The command.
            cwd: Where it runs (the workdir if None).
            timeout: Seconds it may take.
            **env: Variables for this command only.
        """
        done = subprocess.run(
            argv,
            cwd=cwd or self.workdir,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise AssertionError(f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    def check_running(self, what: str | Callable[[], str] = "the end") -> None:
        """Fail, with its log, when a service has exited.

        Args:
            what: What was awaited (a callable: described only when it fails).
        """
        for service in self.running.values():
            if not service.alive():
                raise AssertionError(
                    f"{service.name} exited with {service.process.returncode} before "
                    f"{_describe(what)}:\n{service.tail()}"
                )

    def wait_for(
        self,
        condition: Callable[[], bool],
        what: str | Callable[[], str],
        timeout: float = 240,
        poll: float = 0.3,
    ) -> None:
        """Wait until ``condition()``; fail early when a service died, late when it timed out.

        Args:
            condition: Checked every ``poll`` seconds.
            what: What is awaited, for the failure (a callable: described only then).
            timeout: Seconds to wait at most.
            poll: Seconds between checks.
        """

        def satisfied() -> bool:
            if condition():
                return True
            self.check_running(what)
            return False

        wait_until(satisfied, what, timeout, poll)

    def wait_http(self, url: str, what: str, timeout: float = 120, **headers: str) -> None:
        """Wait until ``url`` answers 200.

        Args:
            url: The address to GET (a health endpoint).
            what: What is awaited, for the failure.
            timeout: Seconds to wait at most.
            **headers: Extra request headers.
        """
        self.wait_for(lambda: answers(url, headers), what, timeout)

    def prefect_api(self, endpoint: str, body: dict | None = None) -> Any:
        """A call to the Prefect server at ``env["PREFECT_API_URL"]`` (POST with ``body``).

        Args:
            endpoint: The path below ``/api``, e.g. ``flow_runs/filter``.
            body: POSTed as JSON; None makes it a GET.
        """
        return rest(f"{self.env['PREFECT_API_URL']}/{endpoint}", body)

    def mlflow_api(self, endpoint: str, body: dict) -> Any:
        """A POST to the MLflow server at ``env["MLFLOW_TRACKING_URI"]``.

        Args:
            endpoint: The path below ``/api/2.0/mlflow``, e.g. ``runs/search``.
            body: The request, as JSON.
        """
        return rest(f"{self.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/{endpoint}", body)

    def wait_flow_runs(
        self, runs: Mapping[str, str], timeout: float = 600, poll: float = 2
    ) -> dict[str, dict]:
        """Wait until every flow run is in a final state; their states.

        Args:
            runs: Flow-run ids by the names the result and a failure call them.
            timeout: Seconds to wait at most.
            poll: Seconds between rounds of calls to the Prefect API.

        Returns:
            Each run's final state (Prefect's JSON: ``type``, ``name``, ...) by its name.
        """
        states: dict[str, dict] = {}

        def ended() -> bool:
            for name, run_id in runs.items():
                if name not in states:
                    state = self.prefect_api(f"flow_runs/{run_id}")["state"]
                    if state["type"] in FINAL_STATES:
                        states[name] = state
            return len(states) == len(runs)

        def still_running() -> str:
            return f"flow runs to end; still running: {sorted(set(runs) - set(states))}"

        self.wait_for(ended, still_running, timeout, poll)
        return states

    def kill(self, name: str) -> None:
        """SIGKILL a service and everything in its session (a host going down).

        Args:
            name: The running service's name.
        """
        service = self.running.pop(name)
        _signal_group(service.process, signal.SIGKILL)
        service.process.wait()

    def stop(self, name: str, timeout: float = 30) -> None:
        """Stop a service the documented way, SIGKILL after ``timeout``.

        What it started in sessions of its own (a worker's flow runs) is SIGKILLed too if it
        outlives the service.

        Args:
            name: The running service's name.
            timeout: Seconds it may take to exit.
        """
        service = self.running.pop(name)
        descendants = _descendants(service.process.pid)
        if service.interrupts:
            for _ in range(service.interrupts):
                if service.alive():
                    _signal_group(service.process, signal.SIGINT)
                    time.sleep(1)
        else:
            _signal_group(service.process, signal.SIGTERM)
        try:
            service.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(service.process, signal.SIGKILL)
            service.process.wait()
        for process in descendants:
            # psutil compares start times, so a PID reused since is left alone.
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    def stop_all(self) -> None:
        """Stop every service, the last started first (workers before their servers)."""
        for name in reversed(list(self.running)):
            self.stop(name)


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def mlflow_server_argv(port: int, backend: str, *extra: str) -> list[str]:
    """``mlflow server`` on 127.0.0.1 with one worker (as the README runs it).

    Args:
        port: The port it listens on.
        backend: ``--backend-store-uri``.
        *extra: More options, e.g. ``--serve-artifacts``.
    """
    return [
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend,
        *extra,
    ]


def prefect_server_argv(port: int) -> list[str]:
    """``prefect server start`` on 127.0.0.1.

    Args:
        port: The port it listens on.
    """
    return ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
