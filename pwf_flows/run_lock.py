"""One process per experiment: a lock on its folder with the owner's heartbeat.

Two processes computing the same experiment would do all the work twice and log every metric
twice into one MLflow run. The owner holds an exclusive ``flock`` on ``<experiment>/run.lock``
(the kernel releases it when the process dies, however it dies) and writes who it is to
``run.owner`` every :data:`HEARTBEAT_S` seconds. Another process is refused while the lock is
held, or while the owner file names a live owner: a process on this host that still exists, or
one on another host (a shared artifacts mount, where ``flock`` may not reach across hosts)
whose heartbeat is younger than :data:`STALE_AFTER_S`. A dead owner's lock therefore blocks
nobody: on the same host at once, across hosts once its heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pwf_core._files import write_text_atomic

HEARTBEAT_S = 10.0
STALE_AFTER_S = 3 * HEARTBEAT_S


class ExperimentBusy(RuntimeError):
    """The experiment is being computed by another live process."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    beat = time.time() - float(owner.get("heartbeat", 0))
    return (
        f"process {owner.get('pid')} on {owner.get('host')} (since {since}, last heartbeat "
        f"{beat:.0f} s ago)"
    )


def _live_owner(owner: dict[str, Any] | None) -> bool:
    """Whether the owner file names a process that may still be computing."""
    if owner is None:
        return False
    if owner.get("host") == socket.gethostname():
        return owner.get("pid") != os.getpid() and process_alive(int(owner.get("pid", -1)))
    return time.time() - float(owner.get("heartbeat", 0)) < STALE_AFTER_S


def owner_of(folder: Path) -> str | None:
    """Who computes the experiment in ``folder`` now, or ``None`` when nobody does."""
    lock = folder / "run.lock"
    if not lock.is_file():
        return None
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_read_owner(folder / "run.owner"))
        fcntl.flock(handle, fcntl.LOCK_UN)
    owner = _read_owner(folder / "run.owner")
    return _describe(owner) if _live_owner(owner) else None


@contextmanager
def exclusive_run(folder: Path, what: str) -> Iterator[None]:
    """Hold the experiment in ``folder`` for this process for the length of the block.

    Args:
        folder: The experiment's artifacts folder (created if missing).
        what: The experiment, as the refusal names it.

    Raises:
        ExperimentBusy: naming the other process, when a live one holds the experiment.
    """
    folder.mkdir(parents=True, exist_ok=True)
    owner_file = folder / "run.owner"
    handle = open(folder / "run.lock", "a")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExperimentBusy(_busy(what, _read_owner(owner_file))) from None
        owner = _read_owner(owner_file)
        if _live_owner(owner):
            raise ExperimentBusy(_busy(what, owner))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        stop = threading.Event()

        def beat() -> None:
            while True:
                with contextlib.suppress(OSError):  # a full disk must not kill the owner
                    write_text_atomic(owner_file, json.dumps(me | {"heartbeat": time.time()}))
                if stop.wait(HEARTBEAT_S):
                    return

        thread = threading.Thread(target=beat, daemon=True, name="pwf-run-lock")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(OSError):
                owner_file.unlink()
    finally:
        handle.close()  # releases the flock


def _busy(what: str, owner: dict[str, Any] | None) -> str:
    return (
        f"experiment {what} is already running in {_describe(owner)}; wait for it to finish, "
        "or stop it first (a rerun continues where it stopped)"
    )
