"""A quick end for the processes pwf owns.

When the interpreter ends, it walks every object it still tracks looking for cycles, and again
while it tears the modules down. Once torch, MLflow and Prefect are imported that is about
1.5 s of a core per process (measured: ``benchmarks/process_exit.py``), longer than a tiny
experiment's training, paid by every ``pwf`` command, pool worker and worker-started flow run.
At exit the garbage is collected once (its finalizers run as usual), then what is still alive
is frozen out of the later walks (:func:`gc.freeze`): objects are still freed as their last
references drop, only the cycle hunts over everything alive are skipped.

Registered by pwf's entry points and by a flow run in a process of its own (a Prefect worker's
``python -m prefect.engine``), never in an interpreter that merely imports pwf.
"""

from __future__ import annotations

import atexit
import gc
import sys

_registered = False


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def end_quickly() -> None:
    """At this process's exit, collect the garbage, then freeze what is alive (once)."""
    global _registered
    if not _registered:
        atexit.register(_collect_then_freeze)
        _registered = True


def end_quickly_if_flow_process() -> None:
    """:func:`end_quickly` when this process was started to run one flow run (a worker's
    ``python -m prefect.engine``); nothing in any other process."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "prefect.engine":
        end_quickly()
