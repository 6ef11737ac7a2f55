"""A temporary Prefect server for ``pwf run``/``pwf sweep`` that dies with the command.

Without ``PREFECT_API_URL`` Prefect would start its own temporary server in a child process
that outlives a SIGKILLed parent (about 200 MB, still listening). pwf starts the same server
(Prefect's app under uvicorn, UI off) with the Linux parent-death signal set, so the kernel
stops it whenever the command ends, however it ends. The server is the command's to stop: it
runs in a session of its own with SIGTERM blocked, so a SIGTERM to the command's process group
or to every process of a job (what batch schedulers and ``systemctl stop`` send) reaches the
command, which marks its runs KILLED through the still-listening server and then stops it with
SIGINT, instead of retrying for a minute against a server that died first. Starts are
serialised by a lock file, so two commands on a fresh ``PREFECT_HOME`` do not migrate its
database at the same time. The links Prefect gives the runs (``PREFECT_UI_URL``) name the
Prefect UI of ``pwf ui``, which serves the same ``PREFECT_HOME`` after the command ended.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pwf_core._files import file_lock
from pwf_flows.errors import ServerError
from pwf_flows.links import PREFECT_UI

PR_SET_PDEATHSIG = 1
DRAIN_TIMEOUT_S = 3.0  # per queue; an interrupted command must end within seconds


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_child(parent: int) -> None:
    """In the server's process, before it starts: die with the parent, ignore SIGTERM.

    A blocked signal stays blocked through ``exec`` and uvicorn's handlers (they do not touch
    the mask), so only the parent's SIGINT or its death ends the server.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    die_with_parent(parent, signal.SIGKILL)


def die_with_parent(parent: int, sent: signal.Signals) -> None:
    """In a child process, before it starts: receive ``sent`` when the command that started
    it dies, however it dies (Linux ``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sent)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def _drain_prefect_clients() -> None:
    """Send Prefect's queued logs and events while the server still listens; later records
    stay local (otherwise they would be retried against a closed port for a minute)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler, APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=DRAIN_TIMEOUT_S)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in [h for h in logger.handlers if isinstance(h, APILogHandler)]:
                logger.removeHandler(handler)


@contextmanager
def prefect_api() -> Iterator[str]:
    """Yield the Prefect API URL: ``PREFECT_API_URL`` when set, else a temporary server's.

    Raises:
        ServerError: when the temporary server exits or does not answer in time
            (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, 120 s by default).
    """
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    if "prefect" in sys.modules:
        # Prefect reads its settings when imported; a URL set now would be ignored.
        raise ServerError("start the temporary Prefect server before importing prefect")
    package = importlib.util.find_spec("prefect")
    assert package is not None and package.origin is not None

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    parent = os.getpid()
    with file_lock(home / "server-start.lock"):
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        log = open(home / "temporary-server.log", "ab")  # noqa: SIM115 (lives with the server)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(package.origin).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _server_child(parent),
        )
        deadline = time.monotonic() + timeout
        while not answers(f"{url}/health"):
            if process.poll() is not None:
                log.close()
                raise ServerError(
                    f"the temporary Prefect server exited ({process.returncode}); see "
                    f"{home / 'temporary-server.log'}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise ServerError(f"the temporary Prefect server did not answer in {timeout:.0f} s")
            time.sleep(0.2)
    os.environ["PREFECT_API_URL"] = url
    # The temporary server has no UI and is gone once the command ends: the links Prefect
    # makes (flow_run.ui_url, task runs) name where `pwf ui` serves this PREFECT_HOME.
    ui_url = None if "PREFECT_UI_URL" in os.environ else PREFECT_UI.url()
    if ui_url:
        os.environ["PREFECT_UI_URL"] = ui_url
    try:
        yield url
    finally:
        _drain_prefect_clients()
        del os.environ["PREFECT_API_URL"]
        if ui_url:
            del os.environ["PREFECT_UI_URL"]
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
