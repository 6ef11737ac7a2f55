"""The MLflow store a report reads: opened without creating one, reachable or refused at once."""

from __future__ import annotations

import os

from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from pwf_flows.infra import TrackingUnavailable, set_infra_timeout, wait_for_http
from pwf_flows.report.collect import ReportError
from pwf_flows.tracking import shown_uri, tracking_uri_problem

REACH_S = 10.0  # a report's store answers at once or is a wrong address, not an outage


def open_store(uri: str | None) -> tuple[MlflowClient, str]:
    """A client for ``uri`` (default: ``MLFLOW_TRACKING_URI``) and how to name it.

    A report only reads: a SQLite file that does not exist is not created, a server that does
    not answer within :data:`REACH_S` is not waited for.

    Raises:
        ReportError: naming the store, when it is missing or does not answer.
    """
    named = uri is not None
    uri = uri or os.environ["MLFLOW_TRACKING_URI"]
    shown = shown_uri(uri)
    problem = tracking_uri_problem(uri)
    if problem is not None:
        where = "--tracking-uri" if named else "MLFLOW_TRACKING_URI"
        raise ReportError(f"{where} '{shown}' {problem}")
    set_infra_timeout(REACH_S)
    if uri.startswith("sqlite"):
        database = make_url(uri).database
        if not database or not os.path.isfile(database):
            raise ReportError(
                f"no MLflow store at {shown}: run an experiment first, or name the store "
                "with --tracking-uri"
            )
    elif uri.startswith(("http://", "https://")):
        try:
            wait_for_http(
                f"{uri.rstrip('/')}/health", f"MLflow at {shown}", TrackingUnavailable, REACH_S
            )
        except TrackingUnavailable as err:
            raise ReportError(str(err)) from None
    return MlflowClient(uri), shown
