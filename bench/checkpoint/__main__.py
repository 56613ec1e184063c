"""bench/checkpoint: what SQLite's WAL checkpoints cost the receiver's commits.

Run it as ``.venv/bin/python bench/checkpoint [--seconds S] [--rate N] [--pages P]
[--busy-disk]`` from the repository (``bench/README.md``). It is a benchmark, not a test:
it measures and prints.

On SQLite the commit that takes the WAL past ``wal_autocheckpoint`` pages copies the WAL
into the database file and syncs it before it returns. For each way the receiver's
engine can be made (``checkpoint_late`` off: SQLite's default 1,000 pages, as every
connection had; on: :data:`storage.engine.SQLITE_LATE_CHECKPOINT_PAGES`, as the web role
makes it now), a fresh database file and, for ``--seconds``, a worker process (an
ordinary engine) committing ``--pages`` pages of rows every 10 ms beside the receiver
committing one small row ``--rate`` times a second, each commit timed from its
``BEGIN``; with ``--busy-disk``, a third process writes and syncs 32 MiB again and again,
as a backup or a copy on the same box would. Printed: the receiver's commits (median,
p99, longest, how many over 100 ms) and its p99 against the default's, in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parents[1]))

import sqlalchemy as sa  # noqa: E402

from storage.engine import make_engine  # noqa: E402

PAGE = 4096
SLOW = 0.1
"""A receiver commit slower than this (seconds) is counted apart."""


def _work(url: str, pages: int, stop_at: float) -> None:
    """The worker: ``pages`` pages of rows every 10 ms, through an ordinary engine."""
    engine = make_engine(url)
    blob = sa.table("blob", sa.column("data"))
    try:
        while time.time() < stop_at:
            with engine.begin() as connection:
                connection.execute(sa.insert(blob).values(data=b"w" * (pages * PAGE)))
            time.sleep(0.01)
    finally:
        engine.dispose()


def _fill_disk(path: Path, stop_at: float) -> None:
    """Another writer on the box (a backup, a copy): 32 MiB written and synced, again."""
    chunk = b"d" * (32 << 20)
    with path.open("wb") as stream:
        while time.time() < stop_at:
            stream.seek(0)
            stream.write(chunk)
            stream.flush()
            os.fsync(stream.fileno())


def measure(
    directory: Path, *, late: bool, seconds: float, rate: float, pages: int, busy_disk: bool
) -> list[float]:
    """The receiver's commit times (seconds) beside the worker, in a fresh database."""
    database = directory / f"late-{late}.sqlite3"
    url = f"sqlite:///{database}"
    setup = make_engine(url)
    with setup.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB)")
        connection.exec_driver_sql("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT)")
    setup.dispose()
    note = sa.table("note", sa.column("body"))
    stop_at = time.time() + seconds
    # Forked before the receiver's engine exists: the worker shares no connection with it.
    fork = multiprocessing.get_context("fork")
    others = [fork.Process(target=_work, args=(url, pages, stop_at))]
    if busy_disk:
        others.append(fork.Process(target=_fill_disk, args=(directory / "other.bin", stop_at)))
    for other in others:
        other.start()
    receiver = make_engine(url, lock_timeout=5, checkpoint_late=late)
    times: list[float] = []
    try:
        start = time.perf_counter()
        count = 0
        while time.time() < stop_at:
            due = start + count / rate
            count += 1
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            began = time.perf_counter()
            with receiver.begin() as connection:
                connection.execute(sa.insert(note).values(body="x" * 600))
            times.append(time.perf_counter() - began)
    finally:
        for other in others:
            other.join()
        receiver.dispose()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/checkpoint", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="per way (20)")
    parser.add_argument("--rate", type=float, default=100.0, help="receiver commits/s (100)")
    parser.add_argument("--pages", type=int, default=5, help="worker's pages per commit (5)")
    parser.add_argument(
        "--busy-disk", action="store_true", help="another process writing and syncing 32 MiB"
    )
    arguments = parser.parse_args(argv)
    results: dict[bool, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="otacm-bench-checkpoint-") as scratch:
        for late in (False, True):
            results[late] = measure(
                Path(scratch),
                late=late,
                seconds=arguments.seconds,
                rate=arguments.rate,
                pages=arguments.pages,
                busy_disk=arguments.busy_disk,
            )
    print(f"{'receiver engine':28} {'commits':>8} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} "
          f"{'over 100 ms':>12}")  # fmt: skip
    p99: dict[bool, float] = {}
    for late, times in results.items():
        ordered = sorted(times)
        p99[late] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        name = "checkpoint_late (10,000 pages)" if late else "default (1,000 pages)"
        print(
            f"{name:28} {len(ordered):>8} {statistics.median(ordered) * 1000:>10.2f} "
            f"{p99[late]:>8.2f} {ordered[-1] * 1000:>8.1f} "
            f"{sum(1 for value in ordered if value > SLOW):>12}"
        )
    print(f"p99 ratio, late / default: {p99[True] / p99[False]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
