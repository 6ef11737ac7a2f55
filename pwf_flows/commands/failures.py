"""How a ``pwf`` command ends when something goes wrong: one line, and no traceback for what
is not a bug.

A failure a user can act on (bad input, a server that stayed away, a full disk, the experiment
busy, Ctrl-C) ends in one ``pwf:`` line and an exit code of its own (:mod:`pwf_flows.infra`);
the libraries' own logging of it (Prefect's engine logs a failed task with its traceback) is
kept to its line.
"""

from __future__ import annotations

import logging

from pwf_core.errors import ConfigError
from pwf_flows.infra import DiskFull, InfraUnavailable, is_disk_full
from pwf_flows.run_lock import ExperimentBusy


def one_line(message: str) -> str:
    """A possibly multi-line error as one line: ``title: field: problem; field: problem``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} " + "; ".join(lines[1:])
    return "; ".join(lines)


def quiet_prefect() -> None:
    """After Ctrl-C, Prefect's engine would log the interruption as a crash with a traceback."""
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def expected(error: BaseException | None) -> bool:
    """A failure that ends in one ``pwf:`` line (and its rerun), not in a bug report."""
    expected = (KeyboardInterrupt, InfraUnavailable, DiskFull, ExperimentBusy, ConfigError)
    return error is not None and (isinstance(error, expected) or is_disk_full(error))


class _ExpectedFailureFilter(logging.Filter):
    """Prefect's engine logs a failed task or flow with its traceback; for an expected failure
    (a full disk, a server that stayed away, the experiment busy) the log line stays, the
    traceback goes: the command's last line says what happened and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and expected(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def no_tracebacks_for_expected_failures() -> None:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _ExpectedFailureFilter) for f in handler.filters):
                handler.addFilter(_ExpectedFailureFilter())


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Kubernetes, Slurm and ``kill`` send), handled like Ctrl-C: every layer
    that closes a run on an interrupt (Prefect's engine, the MLflow run, the temporary server)
    does so for this too."""


def disk_message(err: BaseException, where: str) -> str:
    return (
        f"no space left on the disk of {where} ({one_line(str(err))}); free space there and "
        "run the same command to continue"
    )
