"""bench/quota/places.py: how busy one key's places in flight stay as processes are added.

Run it as ``.venv/bin/python bench/quota/places.py [--db sqlite|postgresql|both]
[--processes 1,2,4] [--threads 4] [--places 4] [--hold-ms 200] [--seconds 10]`` from the
repository. It is a benchmark, not a test: it measures and prints a table.

Each process takes ``--threads`` threads through the key's shared throttle
(:func:`storage.venue_limits.shared_throttle`'s kinds, on a fresh database), each
holding a place for ``--hold-ms`` (a venue call, without the venue) and asking again at
once, for ``--seconds``. The rate is set far above what the places allow, so the
places alone bound the pace: ``places / hold`` calls a second when no place is ever
idle. Printed per database and number of processes, for the wait as it is (blocking
until a release wakes the waiter) and, measured in the same run, as it was (a try, then
a sleep of 25 to 50 ms, again and again): calls a second, how busy the places were
(held time over ``places x seconds``), the most held at once (never above ``places``),
the longest a call waited for its place, the calls each process made (a process kept
waiting shows as a small share), and the throttle's database statements a second
(PostgreSQL: ``pg_stat_database.xact_commit``; every statement commits on its own).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent / "ingest"))

from servers import DatabaseFactory, postgresql_server  # noqa: E402

from storage.engine import make_engine  # noqa: E402
from storage.locks import default_lock_dir  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.venue_limits import FileThrottle, PostgresThrottle  # noqa: E402
from venue.throttle import Limits, SharedThrottle  # noqa: E402

IDENTITY = "c" * 64
POLL = 0.05
"""The wait as it was: the longest sleep between two tries for a place."""
MODES = ("polling (before)", "blocking")


class _Polling:
    """The wait for a place as it was: try, sleep 25 to 50 ms, try again."""

    def _wait_for_place(self, timeout: float) -> AbstractContextManager[None] | None:
        jitter = random.Random()  # spreads tries, not a secret
        deadline = time.monotonic() + timeout
        while True:
            place = super()._wait_for_place(0)  # type: ignore[misc]
            if place is not None or time.monotonic() >= deadline:
                return place  # type: ignore[no-any-return]
            time.sleep(POLL * (0.5 + jitter.random() / 2))


class _PollingPostgres(_Polling, PostgresThrottle):
    pass


class _PollingFile(_Polling, FileThrottle):
    pass


def _throttle(url: str, mode: str, limits: Limits) -> SharedThrottle:
    engine = make_engine(url)
    polling = mode == MODES[0]
    if engine.dialect.name == "postgresql":
        kind: type[PostgresThrottle] = _PollingPostgres if polling else PostgresThrottle
        return kind(engine.url, IDENTITY, limits)
    file_kind: type[FileThrottle] = _PollingFile if polling else FileThrottle
    return file_kind(default_lock_dir(engine), IDENTITY, limits)


def child(arguments: dict[str, Any]) -> None:
    """One process: says ``ready``, reads the start time every process shares, then its
    threads take places until the start plus the seconds; prints each held interval and
    the longest wait, as JSON."""
    limits = Limits(max_in_flight=arguments["places"], rate=1_000_000, period=1.0)
    throttle = _throttle(arguments["url"], arguments["mode"], limits)
    hold = arguments["hold_ms"] / 1000
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    end = start + arguments["seconds"]
    held: list[tuple[float, float]] = []
    longest = 0.0
    lock = threading.Lock()

    def work() -> None:
        nonlocal longest
        time.sleep(max(0.0, start - time.time()))
        while (asked := time.time()) < end:
            with throttle.slot():
                got = time.time()
                time.sleep(hold)
                with lock:
                    held.append((got, time.time()))
                    longest = max(longest, got - asked)

    threads = [threading.Thread(target=work) for _ in range(arguments["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    throttle.close()
    print(json.dumps({"held": held, "longest_wait": longest}))


@dataclass
class Row:
    """One database, mode and number of processes."""

    db: str
    mode: str
    processes: int
    calls_per_s: float
    busy: float
    max_held: int
    longest_wait: float
    per_process: list[int]
    statements_per_s: float | None


def _statements(url: str) -> int | None:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as db:
        return int(
            db.execute(
                sa.text(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                )
            ).scalar_one()
        )


def measure(url: str, db: str, mode: str, processes: int, args: argparse.Namespace) -> Row:
    """Run ``processes`` children on ``url`` and read what they held."""
    payload = {
        "url": url,
        "mode": mode,
        "places": args.places,
        "threads": args.threads,
        "hold_ms": args.hold_ms,
        "seconds": args.seconds,
    }
    before = _statements(url)
    children = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for process in children:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("a process of the benchmark did not start")
    start = time.time() + 0.5
    for process in children:
        assert process.stdin is not None
        process.stdin.write(f"{start}\n")
        process.stdin.flush()
    outputs = [json.loads(c.communicate(timeout=args.seconds + 120)[0]) for c in children]
    after = _statements(url)
    window = args.seconds
    # Calls that got their place within the window; the last ones end after it.
    intervals = [tuple(i) for out in outputs for i in out["held"] if i[0] < start + window]
    # Held at once: a sweep over every start (+1) and end (-1); an end before a start at
    # the same instant (a place passed on).
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    busy = sum(min(e, start + window) - max(s, start) for s, e in intervals) / (
        args.places * window
    )
    return Row(
        db=db,
        mode=mode,
        processes=processes,
        calls_per_s=len(intervals) / window,
        busy=busy,
        max_held=peak,
        longest_wait=max(out["longest_wait"] for out in outputs),
        per_process=[sum(1 for i in out["held"] if i[0] < start + window) for out in outputs],
        statements_per_s=None if before is None or after is None else (after - before) / window,
    )


HEADER = (
    f"{'db':<11}{'wait':<18}{'processes':>9}{'calls/s':>9}{'busy':>7}{'max held':>10}"
    f"{'longest wait s':>16}{'statements/s':>14}  calls per process"
)


def format_row(row: Row, places: int) -> str:
    """One line of the table."""
    statements = "-" if row.statements_per_s is None else f"{row.statements_per_s:.0f}"
    return (
        f"{row.db:<11}{row.mode:<18}{row.processes:>9}{row.calls_per_s:>9.1f}"
        f"{row.busy:>7.0%}{f'{row.max_held} of {places}':>10}{row.longest_wait:>16.2f}"
        f"{statements:>14}  {' / '.join(str(n) for n in row.per_process)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run every database, mode and number of processes, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--processes", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument("--threads", type=int, default=4, help="threads a process (default 4)")
    parser.add_argument("--places", type=int, default=4, help="places in flight (default 4)")
    parser.add_argument("--hold-ms", type=int, default=200, help="a call's length (200 ms)")
    parser.add_argument("--seconds", type=float, default=10.0, help="each run's length (10)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    counts = [int(n) for n in args.processes.split(",")]
    databases = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    print(
        f"places: {args.places} in flight, {args.threads} threads a process, each call "
        f"{args.hold_ms} ms, {args.seconds:.0f} s a run; no idle place: "
        f"{args.places * 1000 / args.hold_ms:.1f} calls/s"
    )
    print(HEADER)
    import tempfile

    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otacm-places-")))
        for db in databases:
            server = stack.enter_context(postgresql_server()) if db == "postgresql" else None
            factory = DatabaseFactory(db, scratch, server)
            for number, processes in enumerate(counts):
                for index, mode in enumerate(MODES):
                    url = factory.new(f"places_{db}_{number}_{index}")
                    upgrade(make_engine(url))
                    row = measure(url, db, mode, processes, args)
                    print(format_row(row, args.places), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
