"""bench/reconcile/history.py: a 7-day reconciliation as the history before it grows.

Run it as ``.venv/bin/python bench/reconcile/history.py [--db sqlite|postgresql|both]
[--lines N] [--history 10000,100000,1000000] [--repeat R] [--out results.json]`` from
the repository (``bench/README.md``). It is a benchmark, not a test: it measures and
prints.

For each database (a fresh SQLite file; a throwaway PostgreSQL server, as
``bench/reconcile`` uses), migrated: the period's ``--lines`` sales and their orders with
the planted cases of :mod:`dataset` (``load``), then history (:func:`dataset.add_history`:
matched sales and orders of the year before the period) grown to each size of
``--history`` in turn. At each size the same 7-day period is reconciled ``--repeat``
times, each in a fresh process (``child.py``, as ``bench/reconcile`` does), the median
wall time kept; each run must find exactly what was planted. Printed per size: the
median seconds and their ratio to the first size's. A run that reads only its period
costs the same at every size (ratio about 1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from dataset import Plan, add_history, load  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, server_for  # noqa: E402

from otacm.settings import Settings  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

DATABASES = ("sqlite", "postgresql")
LINES = 20_000
HISTORY = (10_000, 100_000, 1_000_000)
REPEAT = 3
PER_CATEGORY = 20
SEED = 20261207
NOW = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
PERIOD = dt.timedelta(days=7)


def run_once(url: str, plan: Plan, connection_id: int) -> tuple[float, Counter[str], str]:
    """One reconciliation of the period in a fresh process: seconds, totals, state."""
    settings = Settings()
    command = [
        sys.executable,
        str(HERE / "child.py"),
        f"--url={url}",
        f"--connection-id={connection_id}",
        f"--period-from={plan.period_from.isoformat()}",
        f"--period-to={plan.period_to.isoformat()}",
        f"--now={plan.now.isoformat()}",
        f"--grace={settings.recon_grace}",
        f"--tolerance={settings.recon_amount_tolerance}",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=REPOSITORY, timeout=1800
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchSetupError(f"the reconciling process failed: {done.stderr[-2000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    totals: Counter[str] = Counter()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            run_id = int(measured["run_id"] or 0)
            state = connection.exec_driver_sql(
                f"SELECT state FROM recon_run WHERE id = {run_id}"  # noqa: S608
            ).scalar()
            for category, count in connection.exec_driver_sql(
                "SELECT category, sum(count) FROM recon_total "  # noqa: S608
                f"WHERE recon_run_id = {run_id} GROUP BY category"
            ):
                totals[str(category)] = int(count)
    finally:
        engine.dispose()
    return float(measured["seconds"]), totals, str(state)


def bench_database(
    kind: str, plan: Plan, sizes: list[int], repeat: int, scratch: Path
) -> list[dict[str, Any]]:
    """Load the period, then grow the history size by size and time the period's run."""
    rows: list[dict[str, Any]] = []
    with server_for(kind) as server:
        factory = DatabaseFactory(kind, scratch, server)
        url = factory.new("bench_reconcile_history")
        upgrade(url)
        engine = make_engine(url)
        try:
            loaded = load(engine, plan)
            expected = {str(c): n for c, n in loaded.expected.items() if n}
            had = 0
            for size in sizes:
                started = time.perf_counter()
                add_history(engine, plan, loaded.connection_id, had, size - had)
                had = size
                print(
                    f"{kind}: history {size:,} loaded in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
                seconds = []
                for _ in range(repeat):
                    took, totals, state = run_once(url, plan, loaded.connection_id)
                    found = {k: v for k, v in totals.items() if v}
                    if state != "finished" or found != expected:
                        raise BenchSetupError(f"run {state}: found {found}, planted {expected}")
                    seconds.append(took)
                median = statistics.median(seconds)
                rows.append({"history": size, "seconds": median, "all": seconds})
                print(f"{kind}: history {size:,}: {median:.2f} s {seconds}", flush=True)
        finally:
            engine.dispose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/reconcile/history.py")
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="both")
    parser.add_argument("--lines", type=int, default=LINES)
    parser.add_argument(
        "--history", default=",".join(str(size) for size in HISTORY), help="sizes, ascending"
    )
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.history.split(","))
    plan = Plan(args.lines, PER_CATEGORY, SEED, NOW, NOW - PERIOD)
    print(
        f"bench/reconcile/history.py: a 7-day period of {args.lines:,} sales, history "
        f"{', '.join(f'{s:,}' for s in sizes)} sales and orders before it; "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}",
        flush=True,
    )
    kinds = DATABASES if args.db == "both" else (args.db,)
    results: dict[str, list[dict[str, Any]] | str] = {}
    with tempfile.TemporaryDirectory(prefix="otacm-bench-recon-history-") as scratch:
        for kind in kinds:
            try:
                results[kind] = bench_database(kind, plan, sizes, args.repeat, Path(scratch))
            except BenchSetupError as exc:
                results[kind] = str(exc)
    print()
    print(f"{'database':<11} {'history':>10} {'seconds':>8} {'ratio':>6}")
    for kind, rows in results.items():
        if isinstance(rows, str):
            print(f"{kind:<11} VOID {rows}")
            continue
        for row in rows:
            ratio = row["seconds"] / rows[0]["seconds"]
            print(f"{kind:<11} {row['history']:>10,} {row['seconds']:>8.2f} {ratio:>6.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(not isinstance(rows, str) for rows in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
