"""A Prefect worker for a batch job (a Slurm allocation): Prefect's own process worker that
leaves once its pool has had nothing for it, and hands its trials back before the job ends.

``prefect worker start`` polls until it is stopped, so on a shared cluster a worker holds its
GPU for the job's whole time limit, work or none. Run as
``python -m pwf_flows.pool_worker --pool gpu --limit 1 --idle-exit 300`` (slurm/gpu-workers.sbatch
does, one per allocated GPU), the same :class:`~prefect.workers.process.ProcessWorker` polls the
pool and runs its flow runs, and:

- exits 0 once none of its flow runs has been running or submitted for ``--idle-exit``
  seconds (it stops between two polls, so no flow run is claimed and then left behind); an
  API it cannot reach past its client's retries counts as idle time;
- on SIGUSR1 (the job script passes on Slurm's warning before the time limit, ``--signal``)
  stops polling, sends SIGTERM to its flow runs and waits for them: a pwf trial marks its
  MLflow run KILLED and queues itself again in the study, and the next worker resumes it from
  its checkpoints;
- on SIGTERM or SIGINT (``scancel``, preemption, the time limit itself: Slurm signals every
  process of the job, the flow runs included) stops polling and waits for its flow runs to end
  as they were told, without signalling them again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class _Stop:
    """Why the worker stops polling (empty while it polls)."""

    reason: str = ""
    event: anyio.Event | None = None

    def set(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        assert self.event is not None
        self.event.set()


def flow_run_processes() -> list[int]:
    """The process ids of this process's children: the flow runs a process worker started."""
    pids: list[int] = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    return pids


def _terminate_flow_runs() -> list[int]:
    pids = flow_run_processes()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # it ended meanwhile
            continue
    return pids


async def _on_signals(stop: _Stop) -> None:
    with anyio.open_signal_receiver(*_STOP_SIGNALS) as received:
        async for signum in received:
            if signum == signal.SIGUSR1 and not stop.reason:
                pids = _terminate_flow_runs()
                _say(f"the job's time is nearly up: SIGTERM to flow run processes {pids}")
                stop.set("the job's time limit is near")
            else:
                stop.set(f"{signal.Signals(signum).name} received")


def _say(line: str) -> None:
    print(f"pwf pool worker: {line}", flush=True)


async def serve(pool: str, limit: int, idle_exit_s: float, name: str | None = None) -> str:
    """Poll ``pool`` and run its flow runs until idle for ``idle_exit_s`` or told to stop.

    Args:
        pool: The work pool (a process pool, e.g. ``gpu``).
        limit: Flow runs at once (1 per GPU).
        idle_exit_s: Leave after this many seconds without a flow run to run.
        name: The worker's name in Prefect (default: Prefect's).

    Returns:
        Why it stopped.
    """
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS
    from prefect.workers.process import ProcessWorker

    poll_s = float(PREFECT_WORKER_QUERY_SECONDS.value())
    stop = _Stop(event=anyio.Event())
    async with (
        ProcessWorker(work_pool_name=pool, limit=limit, name=name) as worker,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(_on_signals, stop)
        _say(f"{worker.name} polls pool '{pool}' every {poll_s:g} s (at most {limit} at once)")
        busy_at = synced_at = time.monotonic()
        while not stop.reason:
            submitted = []
            try:
                if time.monotonic() - synced_at >= worker.heartbeat_interval_seconds:
                    await worker.sync_with_backend()
                    synced_at = time.monotonic()
                submitted = await worker.get_and_submit_flow_runs()
            except Exception as err:  # the API is away past its client's retries: poll again
                _say(f"cannot poll the Prefect API ({type(err).__name__}: {err}); trying again")
            if submitted or worker.limiter.borrowed_tokens:
                busy_at = time.monotonic()
            elif time.monotonic() - busy_at >= idle_exit_s:
                stop.set(f"no flow run for {idle_exit_s:g} s")
                break
            with anyio.move_on_after(poll_s):
                await stop.event.wait()
        running = worker.limiter.borrowed_tokens
        _say(f"stops polling ({stop.reason}); waiting for {running} flow run(s) to end")
        while worker.limiter.borrowed_tokens:
            await anyio.sleep(0.5)
        tasks.cancel_scope.cancel()
    return stop.reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pwf_flows.pool_worker",
        description="A Prefect process worker that leaves when its pool has nothing for it.",
    )
    parser.add_argument("--pool", required=True, help="the work pool, e.g. gpu")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="leave after this long without a flow run (default 300)",
    )
    parser.add_argument("--name", help="the worker's name in Prefect")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.idle_exit <= 0:
        print("pwf: --limit must be at least 1 and --idle-exit above 0", file=sys.stderr)
        return 2
    from pwf_flows.environment import configure_environment

    configure_environment()
    reason = anyio.run(serve, args.pool, args.limit, args.idle_exit, args.name)
    _say(f"stopped: {reason}")
    return 0


if __name__ == "__main__":
    from pwf_flows.process_exit import end_quickly

    end_quickly()
    sys.exit(main())
