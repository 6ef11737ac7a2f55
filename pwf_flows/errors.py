"""Errors the ``pwf`` command reports in one line (kept apart from the heavy imports)."""


class TrackingError(RuntimeError):
    """MLflow cannot record the run (e.g. its experiment was deleted in the UI)."""


class ServerError(RuntimeError):
    """The temporary Prefect server did not come up."""
