"""The scheduler and the batch commands lower their CPU priority (OTACM_BATCH_NICE); the
worker does not: real processes, their nice value read from the kernel as they run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from otacm.settings import Settings
from reconciler.ledger_file import REQUIRED_COLUMNS
from tests.e2e.conftest import E2E, OtacmProcess, otacm_environment, wait_until

pytestmark = pytest.mark.process


def _nice(pid: int) -> int:
    """A process's nice value, as the kernel has it (field 19 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name, in parentheses, may hold spaces: count after its end.
    return int(stat[stat.rindex(")") + 2 :].split()[16])


@pytest.mark.parametrize("batch_nice", ["10", "0"])
def test_a_ledger_import_runs_at_the_batch_priority(
    e2e: E2E,
    settings: Settings,
    otacm: Callable[..., OtacmProcess],
    tmp_path: Path,
    batch_nice: str,
) -> None:
    """Held reading its file (a named pipe), the import runs ``OTACM_BATCH_NICE`` above the
    test's own priority; then it imports the file as ever."""
    ledger = tmp_path / "sales.csv"
    os.mkfifo(ledger)
    environment = otacm_environment(settings, OTACM_BATCH_NICE=batch_nice)
    command = otacm("ledger", "import", str(ledger), environment=environment)
    # Opening the pipe for writing waits for the import to open it for reading.
    with ledger.open("w", encoding="utf-8") as pipe:
        assert _nice(command.popen.pid) == os.nice(0) + int(batch_nice)
        pipe.write(",".join(REQUIRED_COLUMNS) + "\n")
        pipe.write(
            f"{settings.connections[0].partner_ids[0]},NICE-1,2026-12-01T10:00:00Z,1,10.00,EUR\n"
        )
    assert command.popen.wait(timeout=60) == 0, command.output()
    assert "1 inserted" in command.output()


def test_the_scheduler_runs_at_the_batch_priority_and_the_worker_does_not(
    e2e: E2E, settings: Settings, otacm: Callable[..., OtacmProcess]
) -> None:
    """The scheduler's jobs are batch work; the worker's fetching is not."""
    environment = otacm_environment(settings, OTACM_BATCH_NICE="7")
    scheduler = otacm("scheduler", environment=environment)
    worker = otacm("worker", environment=environment)
    wait_until(
        lambda: "started with jobs" in scheduler.output() or not scheduler.alive(),
        60,
        what="the scheduler started",
    )
    assert scheduler.alive(), scheduler.output()
    assert _nice(scheduler.popen.pid) == os.nice(0) + 7
    assert worker.alive(), worker.output()
    assert _nice(worker.popen.pid) == os.nice(0)
