"""Infrastructure faults: what counts as one, how long to wait it out, and how it ends.

A shared cluster's tracking server, study database or Prefect API can be down for a while (a
restart, a failover, a full connection pool). Such an error says nothing about the trial that
met it, so pwf retries the call with exponential backoff for ``infra_timeout_s`` (10 minutes by
default) instead of recording a failed trial; only when the outage outlasts that does the
command stop, with one ``pwf:`` line and an exit code of its own, and the same command continues
where it stopped once the service is back.

Exit codes of the ``pwf`` command (also in the README):

=====  ============================================================================
0      done
1      an unexpected error (a bug: the traceback is printed)
2      bad input, or the experiment is already running in another process
3      the MLflow tracking server is unreachable
4      the Prefect API is unreachable
5      the Optuna study database is unreachable
6      no space left on the artifacts disk
130    interrupted (Ctrl-C)
143    terminated (SIGTERM)
=====  ============================================================================
"""

from __future__ import annotations

import errno
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

DEFAULT_INFRA_TIMEOUT_S = 600.0
# How long a command waits for a service at its start: with the command's own start (imports,
# reading its input) a silent server is reported within 30 s of typing the command.
START_TIMEOUT_S = 20.0
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0

_logger = logging.getLogger("pwf.infra")
_timeout_s = DEFAULT_INFRA_TIMEOUT_S


class InfraUnavailable(RuntimeError):
    """A service pwf depends on stayed unreachable for longer than it was allowed to.

    Args:
        message: One line naming the service and its address (credentials masked).
    """

    exit_code = 1


class TrackingUnavailable(InfraUnavailable):
    exit_code = 3


class PrefectUnavailable(InfraUnavailable):
    exit_code = 4


class StudyStorageUnavailable(InfraUnavailable):
    exit_code = 5


class DiskFull(RuntimeError):
    """No space left under the artifacts folder (the run resumes once space is freed)."""

    exit_code = 6


def infra_timeout_s() -> float:
    """How long calls wait out an outage before giving up (see :func:`set_infra_timeout`)."""
    return _timeout_s


def set_infra_timeout(timeout_s: float) -> None:
    """Set how long this process waits out an outage (a command sets it from its config)."""
    global _timeout_s
    _timeout_s = float(timeout_s)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_TRANSIENT_TEXT = (
    "failed with exception",  # MLflow's REST client: the request never got an answer
    "connection refused",
    "connection reset",
    "could not connect",
    "server closed the connection",
    "terminating connection",
    "database is locked",
    "timed out",
    "temporarily unavailable",
    "max retries exceeded",
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its cause chain) is an outage rather than a result.

    Outages: refused or dropped connections and timeouts (socket, urllib3/requests, httpx),
    HTTP 429/5xx answers, SQLAlchemy's ``OperationalError``/``InterfaceError`` (the database
    went away, a lock timed out) and Optuna's ``StorageInternalError`` caused by one.
    """
    for item in _chain(error):
        name = type(item).__name__
        module = type(item).__module__
        if isinstance(item, (ConnectionError, TimeoutError)):
            return True
        if name in {"OperationalError", "InterfaceError", "DisconnectionError"} and (
            module.startswith(("sqlalchemy", "psycopg", "sqlite3"))
        ):
            return True
        if module.startswith(("requests", "urllib3", "httpx", "httpcore")) and any(
            word in name for word in ("Connect", "Timeout", "Protocol", "RemoteDisconnected")
        ):
            return True
        status = getattr(getattr(item, "response", None), "status_code", None)
        if isinstance(status, int) and (status == 429 or status >= 500):
            return True
        text = str(item).lower()
        if module.startswith("mlflow") and (
            any(word in text for word in _TRANSIENT_TEXT)
            or any(f"error code {code}" in text for code in (429, 500, 502, 503, 504))
        ):
            return True
        if module.startswith("optuna") and any(word in text for word in _TRANSIENT_TEXT):
            return True
    return False


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C, or SIGTERM: pwf's own handler raises a ``KeyboardInterrupt``; inside a flow run
    Prefect's handler raises its ``TerminationSignal`` first (matched by name, so that this
    module imports nothing of Prefect's)."""
    return isinstance(error, KeyboardInterrupt) or any(
        cls.__name__ == "TerminationSignal" for cls in type(error).__mro__
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` comes from a full disk (``ENOSPC``, or a library's message of it)."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(item).lower():
            return True
    return False


# The services this process found unreachable, and since when: an outage is announced once,
# when the first call meets it, and its end once, whichever calls (threads included) wait.
_outages: dict[str, float] = {}
_outages_lock = threading.Lock()


def _outage_began(service: str, error: BaseException, budget_s: float) -> None:
    with _outages_lock:
        if service in _outages:
            return
        _outages[service] = time.monotonic()
    _logger.warning(
        "pwf: %s is unreachable (%s); waiting up to %.0f s for it to come back",
        service,
        _first_line(error),
        budget_s,
    )


def _outage_ended(service: str) -> None:
    with _outages_lock:
        began = _outages.pop(service, None)
    if began is not None:
        _logger.warning("pwf: %s is back after %.0f s", service, time.monotonic() - began)


def retry_transient(
    call: Callable[[], T],
    service: str,
    unavailable: type[InfraUnavailable],
    timeout_s: float | None = None,
    *,
    doing: str | None = None,
    quiet: bool = False,
) -> T:
    """Run ``call``, retrying outages with exponential backoff (1 s, 2 s, ... 30 s).

    The outage is logged once, when it begins, and once when the service is back, however
    many calls wait it out meanwhile.

    Args:
        call: The operation; it must be safe to repeat after a failed attempt.
        service: The service and its address (credentials masked), for the log and the error.
        unavailable: The error raised when the outage outlasts ``timeout_s``.
        timeout_s: How long to keep trying (default: :func:`infra_timeout_s`).
        doing: What the call was doing, for the final error.
        quiet: Log nothing (a check at a command's start, whose error says it all).

    Raises:
        InfraUnavailable: ``unavailable``, once the outage lasted longer than ``timeout_s``.
        Exception: whatever ``call`` raised that is not an outage, unchanged.
    """
    budget = infra_timeout_s() if timeout_s is None else timeout_s
    started = time.monotonic()
    delay = _BACKOFF_FIRST_S
    failed = False
    while True:
        try:
            result = call()
        except Exception as err:
            if not is_transient(err):
                raise
            waited = time.monotonic() - started
            if waited >= budget:
                where = f"{service} ({doing})" if doing else service
                raise unavailable(
                    f"{where} has been unreachable for {waited:.0f} s ({_first_line(err)}); "
                    "rerun the same command once it is back"
                ) from err
            if not failed and not quiet:
                _outage_began(service, err, budget - waited)
            failed = True
            time.sleep(min(delay, max(budget - waited, 0.1)))
            delay = min(delay * 2, _BACKOFF_MAX_S)
            continue
        if not quiet:
            _outage_ended(service)
        return result


def _first_line(error: BaseException) -> str:
    """What went wrong, in one line: the root of the error's chain (``connection refused``),
    not a wrapper's guess (Optuna's "invalid data in the commit" around a lost connection)."""
    root = list(_chain(error))[-1]
    text = str(root).strip().splitlines()
    first = text[0] if text else type(root).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def wait_for_http(
    url: str,
    what: str,
    unavailable: type[InfraUnavailable],
    timeout_s: float = START_TIMEOUT_S,
    headers: dict[str, str] | None = None,
) -> None:
    """Wait until ``url`` answers (any HTTP status below 500), at most ``timeout_s``.

    Raises:
        InfraUnavailable: ``unavailable``, naming ``what``, when nothing answered in time.
    """
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers=headers or {})
    last = "no answer"
    while True:
        # A server that accepts the connection and never answers costs what is left of the
        # budget, not a fixed timeout past it.
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=max(0.5, min(5.0, left))):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return  # it answers (a 401 without credentials still proves it is up)
            last = f"HTTP {err.code}"
        except (OSError, http.client.HTTPException) as err:
            last = str(getattr(err, "reason", err)) or type(err).__name__
        if time.monotonic() >= deadline - 0.5:
            raise unavailable(
                f"{what} did not answer in {timeout_s:.0f} s ({last}); start it, or point pwf "
                "at another one"
            )
        time.sleep(min(1.0, max(0.0, deadline - 0.5 - time.monotonic())))
