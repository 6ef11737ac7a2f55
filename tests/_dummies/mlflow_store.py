"""What the suite asserts of every MLflow store a test leaves: nothing logged twice; and empty
stores for tests to start from.

Whatever path a run resumed by (a step done again after a damaged checkpoint, the final
evaluation after a lost folder, a trial retried on another worker), no metric may hold two
values at one step. MLflow's own tables say so directly: its ``metrics`` table keeps every
point, its ``params`` table one row per key (a second, different value is refused by MLflow).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import sqlalchemy

_REPEATED = sqlalchemy.text(
    "SELECT run_uuid, key, step, COUNT(*) FROM metrics "
    "GROUP BY run_uuid, key, step HAVING COUNT(*) > 1"
)


def repeated_points(database_url: str) -> list[tuple[str, str, int, int]]:
    """``(run, key, step, count)`` of every metric logged more than once at one step.

    Args:
        database_url: The store's SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``).
    """
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(_REPEATED)]
    finally:
        engine.dispose()


def is_mlflow_store(path: Path) -> bool:
    """Whether the SQLite file at ``path`` holds MLflow's tables."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        return "metrics" in sqlalchemy.inspect(engine).get_table_names()
    except sqlalchemy.exc.DatabaseError:
        return False
    finally:
        engine.dispose()


def assert_logged_once(database_url: str) -> None:
    """Fail, naming them, when metrics of the store at ``database_url`` were logged twice.

    Args:
        database_url: The store's SQLAlchemy URL.
    """
    repeated = repeated_points(database_url)
    assert not repeated, f"metrics logged twice at one step (run, key, step, times): {repeated}"


def assert_stores_logged_once(folder: Path) -> int:
    """Check every MLflow SQLite store under ``folder``; how many there were.

    Args:
        folder: Searched recursively for ``*.db`` files holding MLflow's tables.
    """
    stores = [p for p in folder.rglob("*.db") if p.is_file() and is_mlflow_store(p)]
    for store in stores:
        assert_logged_once(f"sqlite:///{store}")
    return len(stores)


def create_empty_store(path: Path) -> Path:
    """A new MLflow SQLite store at ``path``, as MLflow creates one (every migration applied)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def copy_empty_store(empty: Path, folder: Path) -> str:
    """A copy of the empty store ``empty`` as ``folder/mlruns.db``, its ``Default`` experiment's
    artifacts under ``folder`` as if MLflow had created it there; its URI.

    MLflow migrates a new SQLite file for about a second: dozens of tests start from an empty
    store, so they start from one migration's copies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "mlruns.db"
    shutil.copyfile(empty, target)
    with sqlite3.connect(target) as connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(folder / "mlruns" / "0"),),
        )
    connection.close()
    return f"sqlite:///{target}"
