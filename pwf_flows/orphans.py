"""Prefect runs left RUNNING by a process that was killed (SIGKILL, a lost node) are marked
CRASHED by the next command that works on the same experiment or sweep.

A process that dies without a word cannot close its flow run: Prefect shows it RUNNING for
good. Each flow run that computes an experiment, and each sweep driver, records its Prefect
flow run (and, for an in-process sweep trial, its task run) in its folder. The next command
reads what the previous owner recorded and, once that owner is known to be gone, marks its
unfinished runs (and their unfinished task runs) CRASHED, naming the run that continues them.
For an experiment the owner is gone by construction: the next one holds the experiment's lock
(:mod:`pwf_flows.run_lock`). Sweep drivers may share a study, so each records under its own
name and only the records of drivers that no longer exist on this host are acted on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run, task_run
from prefect.states import Crashed

from pwf_core._files import write_text_atomic
from pwf_flows.run_lock import process_alive

_UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED]
RECORD = "prefect_run.json"


def _current() -> dict[str, Any]:
    return {
        "flow_run": flow_run.id,
        "task_run": task_run.id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value)) if value else None
    except ValueError:
        return None


def _crash(record: dict[str, Any], by: str) -> list[str]:
    """Mark the recorded flow run (and task run), and their unfinished task runs, CRASHED."""
    message = f"its process ended without closing it (killed?); continued by {by}"
    crashed = []
    with get_client(sync_client=True) as client:
        run_id = _uuid(record.get("flow_run"))
        if run_id and str(run_id) != flow_run.id:
            with contextlib.suppress(ObjectNotFound):  # another Prefect server's run
                run = client.read_flow_run(run_id)
                if run.state is not None and not run.state.is_final():
                    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                    crashed.append(f"flow run {run.name}")
                unfinished = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
                    task_run_filter=TaskRunFilter(
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_UNFINISHED))
                    ),
                )
                for task in unfinished:
                    client.set_task_run_state(task.id, Crashed(message=message), force=True)
                    crashed.append(f"task run {task.name}")
        task_id = _uuid(record.get("task_run"))
        if task_id and str(task_id) != task_run.id:
            with contextlib.suppress(ObjectNotFound):
                task = client.read_task_run(task_id)
                if task.state is not None and not task.state.is_final():
                    client.set_task_run_state(task_id, Crashed(message=message), force=True)
                    crashed.append(f"task run {task.name}")
    return crashed


def _this_run() -> str:
    return f"flow run {flow_run.name}" if flow_run.id else f"process {os.getpid()}"


def take_over_experiment(folder: Path) -> list[str]:
    """Crash what the experiment's previous owner left unfinished in Prefect, then record
    this run as the owner. Call with the experiment's lock held.

    Returns:
        The runs marked CRASHED, as ``flow run <name>`` / ``task run <name>``.
    """
    path = folder / RECORD
    previous = _read(path)
    crashed = _crash(previous, _this_run()) if previous and flow_run.id else []
    if flow_run.id:
        write_text_atomic(path, json.dumps(_current()))
    return crashed


def take_over_sweep(folder: Path) -> tuple[Path | None, list[str]]:
    """Crash the Prefect runs of this sweep's drivers that died on this host, then record
    this driver.

    Returns:
        This driver's record (remove it with :func:`release` when the driver ends) and the
        runs marked CRASHED.
    """
    if not flow_run.id:
        return None, []
    drivers = folder / "drivers"
    crashed: list[str] = []
    host = socket.gethostname()
    for path in sorted(drivers.glob("*.json")):
        record = _read(path)
        if record is None or record.get("host") != host or record.get("pid") == os.getpid():
            continue
        if not process_alive(int(record.get("pid", -1))):
            crashed += _crash(record, _this_run())
            path.unlink(missing_ok=True)
    mine = drivers / f"{host}-{os.getpid()}.json"
    write_text_atomic(mine, json.dumps(_current()))
    return mine, crashed


def release(record: Path | None) -> None:
    """Forget a driver's record: it ended and closed its runs itself."""
    if record is not None:
        record.unlink(missing_ok=True)
