"""One reconciliation run in a process of its own, measured: run as ``python child.py ARGS``.

The benchmark starts this script in a fresh interpreter (not a fork of the generator, whose
pages a forked child would inherit), so the process's peak resident set size
(``VmHWM`` of its address space) is that of the reconciliation alone, plus the
interpreter and otacm's imports. It calls :func:`reconciler.engine.reconcile` once and
prints one JSON object on stdout: the run id, the wall time of the call, the peak RSS,
and the SQL statements that took longest (timed by SQLAlchemy cursor events, so where
the time goes can be read without a profiler). Each statement is logged to stderr as it
starts and ends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402

from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.records import ReconTrigger  # noqa: E402

SLOWEST = 8
"""Statements reported, slowest first."""


def _timed_statements(engine: sa.Engine, started: float) -> list[tuple[float, str]]:
    """Record every statement's duration on ``engine``; the list fills as they run.

    Each statement is also written to stderr when it starts and when it ends, with the
    time since ``started``, so a run stopped at the time limit shows what it was doing.
    """
    timings: list[tuple[float, str]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
        now = time.perf_counter()
        conn.info.setdefault("bench_started", []).append(now)
        text = " ".join(statement.split())
        print(f"[{now - started:8.2f} s] start {text[:300]}", file=sys.stderr, flush=True)

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
        now = time.perf_counter()
        duration = now - conn.info["bench_started"].pop()
        timings.append((duration, " ".join(statement.split())))
        print(f"[{now - started:8.2f} s] done in {duration:.2f} s", file=sys.stderr, flush=True)

    return timings


def _peak_rss_bytes() -> int:
    """This process's peak resident set size since its ``exec``: ``VmHWM``.

    Not ``ru_maxrss``: Linux keeps that across ``execve``, so it would start from the
    loader's resident size at the fork that started this process.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB too


def main() -> None:
    """Parse the arguments, run the reconciliation, print the measurement."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--connection-id", type=int, required=True)
    parser.add_argument("--period-from", type=dt.datetime.fromisoformat, required=True)
    parser.add_argument("--period-to", type=dt.datetime.fromisoformat, required=True)
    parser.add_argument("--now", type=dt.datetime.fromisoformat, required=True)
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--tolerance", type=Decimal, required=True)
    args = parser.parse_args()

    from reconciler.engine import reconcile  # not importable while R2 writes it: fail here

    engine = make_engine(args.url)
    started = time.perf_counter()
    timings = _timed_statements(engine, started)
    sessions = make_sessions(engine)
    error: str | None = None
    run_id: int | None = None
    try:
        run_id = reconcile(
            sessions,
            connection_id=args.connection_id,
            period_from=args.period_from,
            period_to=args.period_to,
            now=args.now,
            trigger=ReconTrigger.MANUAL,
            actor="bench",
            grace=dt.timedelta(seconds=args.grace),
            tolerance=args.tolerance,
        )
    except Exception as exc:  # reported: the benchmark judges it
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    engine.dispose()
    slowest = sorted(timings, reverse=True)[:SLOWEST]
    print(
        json.dumps(
            {
                "run_id": run_id,
                "error": error,
                "seconds": seconds,
                "peak_rss_bytes": _peak_rss_bytes(),
                "statements": len(timings),
                "sql_seconds": sum(duration for duration, _ in timings),
                "slowest": [
                    {"seconds": round(duration, 3), "sql": sql[:400]} for duration, sql in slowest
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
