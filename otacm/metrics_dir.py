"""The Prometheus multiprocess directory: where the counters of otacm's processes meet.

prometheus-client's multiprocess mode keeps each process's counters in files of one
directory (``PROMETHEUS_MULTIPROC_DIR``), which ``/metrics`` adds up: gunicorn's workers,
and the worker and scheduler that ``otacm serve`` starts beside them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def metrics_directory() -> Iterator[Path]:
    """The Prometheus multiprocess directory of this process and of those it starts.

    prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, so this
    is entered before anything imports it. A directory the operator named is created if
    missing, emptied of an earlier run's files (as prometheus-client requires) and left in
    place. Otherwise a new one is made and named in the environment, which the processes
    started from here inherit; it belongs to this process, which removes it on the way out.

    Only this process: gunicorn's workers are forks of it that leave through the same
    frames (a worker ends by raising ``SystemExit``), and a worker that removed the
    directory would take every worker's counts, and the next worker's start, with it.

    Yields:
        The directory.
    """
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named:
        directory = Path(named)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            # Another role sharing the directory (``otacm serve``'s worker and scheduler,
            # or roles an operator runs side by side) may have started first: its files
            # stay, only those of processes no longer running go.
            if not _process_running(_metrics_file_pid(stale)):
                stale.unlink(missing_ok=True)
        yield directory
        return
    owner = os.getpid()
    directory = Path(tempfile.mkdtemp(prefix="otacm-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    logger.info("metrics of this process and its children in %s", directory)
    try:
        yield directory
    finally:
        if os.getpid() == owner:
            shutil.rmtree(directory, ignore_errors=True)


def _metrics_file_pid(path: Path) -> int | None:
    """The pid in a prometheus-client file's name (``counter_1234.db``), if it has one."""
    _, _, digits = path.stem.rpartition("_")
    return int(digits) if digits.isdigit() else None


def _process_running(pid: int | None) -> bool:
    """Whether ``pid`` names a running process other than this one."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # running, as another user
    return True
