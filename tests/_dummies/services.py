"""Real servers and workers as background processes for tests: started, watched and stopped.

Each process runs in a session of its own, so stopping it stops what it started too (a
worker's flow runs, a server's workers); stopping is the documented way (SIGTERM, or SIGINT
twice for a Prefect worker) with SIGKILL after a timeout, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pwf_flows.server import free_port

__all__ = [
    "Service",
    "Services",
    "answers",
    "free_port",
    "mlflow_server_argv",
    "prefect_server_argv",
]

VENV_BIN = Path(sys.executable).parent
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def answers(url: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``url`` answers 200 right now."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


@dataclass
class Service:
    """One background process and its log."""

    name: str
    process: subprocess.Popen
    log: Path
    interrupts: int = 1  # SIGINTs that stop it (a Prefect worker ignores one SIGTERM)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""


@dataclass
class Services:
    """Background processes started in ``workdir`` with ``env``; :meth:`stop_all` at the end."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    running: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
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
            interrupts: Stop it with this many SIGINTs (0: with SIGTERM).
        """
        log = self.workdir / f"{name}.log"
        with log.open("a") as handle:
            process = subprocess.Popen(
                argv,
                cwd=cwd or self.workdir,
                env={**self.env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(name, process, log, interrupts)
        self.running[name] = service
        return service

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 180, **env: str):
        """Run ``argv`` to its end; fail the test with its output if it fails."""
        done = subprocess.run(
            argv,
            cwd=cwd or self.workdir,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def wait_for(
        self, condition: Callable[[], bool], what: str, timeout: float = 240, poll: float = 0.3
    ) -> None:
        """Wait until ``condition()``; fail early when a service died, late when it timed out."""
        deadline = time.monotonic() + timeout
        while not condition():
            for service in self.running.values():
                assert service.alive(), (
                    f"{service.name} exited waiting for {what}:\n{service.tail()}"
                )
            assert time.monotonic() < deadline, (
                f"timed out after {timeout:.0f} s waiting for {what}"
            )
            time.sleep(poll)

    def wait_http(self, url: str, what: str, timeout: float = 120, **headers: str) -> None:
        self.wait_for(lambda: answers(url, headers), what, timeout)

    def kill(self, name: str) -> None:
        """SIGKILL a service and everything in its session."""
        service = self.running.pop(name)
        _signal_group(service.process, signal.SIGKILL)
        service.process.wait()

    def stop(self, name: str, timeout: float = 30) -> None:
        """Stop a service the documented way, SIGKILL after ``timeout``."""
        service = self.running.pop(name)
        if service.interrupts:
            for _ in range(service.interrupts):
                _signal_group(service.process, signal.SIGINT)
                time.sleep(1)
        else:
            _signal_group(service.process, signal.SIGTERM)
        try:
            service.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(service.process, signal.SIGKILL)
            service.process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def mlflow_server_argv(port: int, backend: str, *extra: str) -> list[str]:
    """``mlflow server`` on 127.0.0.1 with one worker (as the README runs it)."""
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
    return ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
