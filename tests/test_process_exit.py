"""pwf's own processes end without the interpreter's last walks over every live object, and
nothing is lost for it: garbage is still collected and finalized at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", textwrap.dedent(code), *argv]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


# Registered before the entry point runs, so it runs after pwf's handler (atexit is LIFO).
_REPORT_FREEZE = """
    import atexit, gc, os
    atexit.register(lambda: os.write(1, f"frozen={gc.get_freeze_count()}\\n".encode()))
"""


def test_the_pwf_command_freezes_what_is_alive_at_its_exit():
    done = _python(
        _REPORT_FREEZE
        + """
    import sys
    from pwf_flows.cli import console_main
    sys.argv = ["pwf", "report", "--help"]
    sys.exit(console_main())
    """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frozen = int(done.stdout.rsplit("frozen=", 1)[1])
    assert frozen > 10_000  # torch's, MLflow's and Prefect's objects


@pytest.mark.parametrize("main_module", [None, "prefect.engine"])
def test_a_flow_run_freezes_only_in_a_process_of_its_own(main_module):
    """Only a worker's ``python -m prefect.engine`` (its ``__main__`` spec, set here as runpy
    sets it) ends quickly; an interpreter that merely imports pwf is left as it is."""
    done = _python(
        _REPORT_FREEZE
        + f"""
    import importlib.util, sys
    if {main_module!r}:
        sys.modules["__main__"].__spec__ = importlib.util.find_spec({main_module!r})
    import pwf_flows.experiment.flow
    from pwf_flows.process_exit import end_quickly_if_flow_process
    end_quickly_if_flow_process()
    """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frozen = int(done.stdout.rsplit("frozen=", 1)[1])
    assert (frozen > 10_000) if main_module else (frozen == 0)


def test_garbage_cycles_are_still_finalized_at_exit(tmp_path: Path):
    """A cycle that is garbage at exit still runs its finalizer (the exit handlers registered
    before pwf's still run too: the first test's report is one)."""
    done = _python(
        """
        import sys
        from pwf_flows.process_exit import end_quickly

        class Finalized:
            def __init__(self, path):
                self.path = path
                self.me = self  # a cycle: only the cycle collector frees it

            def __del__(self):
                with open(self.path, "w") as handle:
                    handle.write("finalized")

        end_quickly()
        Finalized(sys.argv[1])  # garbage from here on
        """,
        str(tmp_path / "cycle.txt"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cycle.txt").read_text() == "finalized"
