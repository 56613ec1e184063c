"""bench/reconcile: how long a reconciliation of a million sales takes, in how much memory.

Run it as ``.venv/bin/python bench/reconcile [--db sqlite|postgresql|both] [--lines N]
[--quick] [--per-category K] [--seed S] [--out results.json]`` from the repository
(``bench/README.md``). It is a benchmark, not a test: it measures, prints, and judges
the goals: under 60 s and under 1 GiB per run, and every planted case found.

For each database (a fresh SQLite file; a throwaway PostgreSQL server with its default
configuration, ``bench/ingest/servers.py``), migrated with ``storage.migrate.upgrade``:

1. **load** (:mod:`dataset`, timed apart): N ledger lines in a seven-day period and
   about as many venue orders with one item and 1-3 wallets each, with K planted cases
   of every category of :class:`~reconciler.categories.Category` (seeded), plus decoys
   that must come out ``matched`` or not be reported at all.
2. **first**: :func:`reconciler.engine.reconcile` of the period, in a fresh process
   (:mod:`child`): its wall time, its peak RSS (``VmHWM``), and on PostgreSQL the
   server's peak memory meanwhile (the sum of its processes' PSS, sampled every 0.2 s).
3. **re-run**: the same period again, as the daily run does when nothing changed: every
   exception is seen again, none opened anew.

After each run, the counts per category in the run's totals and in its exceptions are
compared with what was planted. Exit status: 0 when every run finished and found what
was planted (goals met or not), 1 otherwise or when a database could not be set up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
"""This folder: run as ``python bench/reconcile``, its modules import each other by name."""
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from dataset import Loaded, Plan, load  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, server_for  # noqa: E402

from otacm.settings import Settings  # noqa: E402
from reconciler.categories import Category  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

DATABASES = ("sqlite", "postgresql")
LINES, QUICK_LINES = 1_000_000, 50_000
PER_CATEGORY = 100
SEED = 20260527
NOW = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
PERIOD = dt.timedelta(days=7)
GOAL_SECONDS = 60.0
GOAL_BYTES = 1 << 30
RUNS = ("first", "re-run")
SAMPLE_EVERY = 0.2
TIME_LIMIT = 600.0
"""A run still going after ten times the goal is stopped: the figure is "over 600 s"."""
MIB = 1 << 20


@dataclass
class Run:
    """One measured reconciliation and what it found."""

    label: str
    measured: dict[str, Any]
    """What :mod:`child` printed: run id, error, seconds, peak RSS, slowest statements."""
    server_peak_bytes: int | None = None
    state: str | None = None
    error: str | None = None
    in_totals: Counter[str] = field(default_factory=Counter)
    in_exceptions: Counter[str] = field(default_factory=Counter)
    opened: int = 0
    """Exceptions this run opened (``opened`` events)."""

    @property
    def seconds(self) -> float:
        return float(self.measured["seconds"])

    @property
    def peak_bytes(self) -> int:
        return int(self.measured["peak_rss_bytes"])

    def found_planted(self, expected: Counter[Category]) -> bool:
        """Every category counted as planted, in the totals and (exceptions) in the list."""
        totals_ok = all(self.in_totals[str(c)] == expected[c] for c in Category)
        exceptions_ok = all(
            self.in_exceptions[str(c)] == (expected[c] if c.is_exception else 0) for c in Category
        )
        return (
            self.state == "finished"
            and totals_ok
            and exceptions_ok
            and set(self.in_totals) <= {str(c) for c in Category}
        )


@dataclass
class Result:
    """One database's load and runs."""

    database: str
    loaded: Loaded | None = None
    load_seconds: float = 0.0
    runs: list[Run] = field(default_factory=list)
    setup_error: str | None = None

    def valid(self) -> bool:
        if self.loaded is None or len(self.runs) != len(RUNS):
            return False
        expected = self.loaded.expected
        return all(run.found_planted(expected) for run in self.runs) and self.runs[-1].opened == 0


def tree_pss_bytes(root: int) -> int:
    """The proportional set size of process ``root`` and its descendants, in bytes.

    PSS shares each shared page (PostgreSQL's shared buffers) among the processes that
    map it, so the sum is the tree's real footprint; RSS would count them once per process.
    """
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    total = 0
    for pid in parents:
        ancestor = pid
        while ancestor and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor != root:
            continue
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return total


@contextmanager
def peak_memory_of(root: int | None) -> Iterator[list[int]]:
    """Sample ``root``'s tree PSS until the block ends; the list holds the peak after it."""
    peak = [0]
    if root is None:
        yield peak
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_bytes(root))
            stop.wait(SAMPLE_EVERY)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _tail(log: Path, lines: int = 12) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def measure(
    url: str,
    plan: Plan,
    loaded: Loaded,
    label: str,
    *,
    server_pid: int | None,
    scratch: Path,
    time_limit: float,
) -> Run:
    """Reconcile the plan's period in a child process, then read what the run stored.

    The child's statement log goes to ``scratch/<label>.log``; past ``time_limit``
    seconds the child is killed and the log's tail is reported.
    """
    settings = Settings()
    command = [
        sys.executable,
        str(HERE / "child.py"),
        f"--url={url}",
        f"--connection-id={loaded.connection_id}",
        f"--period-from={plan.period_from.isoformat()}",
        f"--period-to={plan.period_to.isoformat()}",
        f"--now={plan.now.isoformat()}",
        f"--grace={settings.recon_grace}",
        f"--tolerance={settings.recon_amount_tolerance}",
    ]
    log = scratch / f"{label}.log"
    with peak_memory_of(server_pid) as server_peak, log.open("w") as statements:
        try:
            done = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=statements,
                text=True,
                check=False,
                cwd=REPOSITORY,
                timeout=time_limit,
            )
        except subprocess.TimeoutExpired:
            raise BenchSetupError(
                f"the {label} run did not finish within {time_limit:.0f} s; its last "
                f"statements:\n{_tail(log)}"
            ) from None
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchSetupError(f"the reconciling process failed ({done.returncode}):\n{_tail(log)}")
    run = Run(label, json.loads(done.stdout.strip().splitlines()[-1]))
    run.server_peak_bytes = server_peak[0] if server_pid is not None else None
    run.error = run.measured["error"]
    run_id = run.measured["run_id"]
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if run_id is None:  # the call raised: the latest run row says what happened
                run_id = connection.exec_driver_sql("SELECT max(id) FROM recon_run").scalar()
            row = connection.exec_driver_sql(
                f"SELECT state, error FROM recon_run WHERE id = {int(run_id or 0)}"  # noqa: S608
            ).first()
            if row is not None:
                run.state, run.error = str(row[0]), row[1] or run.error
            for category, count in connection.exec_driver_sql(
                "SELECT category, sum(count) FROM recon_total "  # noqa: S608
                f"WHERE recon_run_id = {int(run_id or 0)} GROUP BY category"
            ):
                run.in_totals[str(category)] = int(count)
            for category, count in connection.exec_driver_sql(
                "SELECT category, count(*) FROM recon_exception "  # noqa: S608
                f"WHERE last_seen_run_id = {int(run_id or 0)} AND state <> 'closed' "
                "GROUP BY category"
            ):
                run.in_exceptions[str(category)] = int(count)
            run.opened = int(
                connection.exec_driver_sql(
                    "SELECT count(*) FROM exception_event "  # noqa: S608
                    f"WHERE recon_run_id = {int(run_id or 0)} AND action = 'opened'"
                ).scalar_one()
            )
    finally:
        engine.dispose()
    return run


def bench_database(kind: str, plan: Plan, scratch: Path, time_limit: float) -> Result:
    """Load and reconcile on one kind of database."""
    result = Result(kind)
    try:
        with server_for(kind) as server:
            factory = DatabaseFactory(kind, scratch, server)
            url = factory.new("bench_reconcile")
            upgrade(url)
            engine = make_engine(url)
            try:
                started = time.perf_counter()
                result.loaded = load(engine, plan)
                result.load_seconds = time.perf_counter() - started
            finally:
                engine.dispose()
            print(f"{kind}: {loaded_line(result)}", flush=True)
            for label in RUNS:
                run = measure(
                    url,
                    plan,
                    result.loaded,
                    label,
                    server_pid=factory.server_pid,
                    scratch=scratch,
                    time_limit=time_limit,
                )
                result.runs.append(run)
                print(f"{kind}: {label}: {run.seconds:.1f} s", flush=True)
    except BenchSetupError as exc:
        result.setup_error = str(exc)
    return result


def loaded_line(result: Result) -> str:
    assert result.loaded is not None
    rows = result.loaded.rows
    return (
        f"loaded {rows['ledger_line']:,} ledger lines, {rows['venue_order']:,} venue orders, "
        f"{rows['order_item']:,} items, {rows['wallet']:,} wallets "
        f"in {result.load_seconds:.1f} s (not measured)"
    )


def verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def report(result: Result) -> list[str]:
    """The printed section for one database."""
    out = [f"== {result.database} =="]
    if result.loaded is None:
        out.append(f"  VOID  could not run: {result.setup_error}")
        return out
    if result.setup_error is not None:
        out.append(f"  {loaded_line(result)}")
        out.append(f"  VOID  {result.setup_error}")
        return out
    expected = result.loaded.expected
    out.append(f"  {loaded_line(result)}")
    header = f"  {'run':<8} {'wall s':>7} {'peak RSS MiB':>13} {'server PSS MiB':>15}  state"
    out.append(header)
    for run in result.runs:
        server = "-" if run.server_peak_bytes is None else f"{run.server_peak_bytes / MIB:,.0f}"
        state = run.state or "?"
        if run.error:
            state += f" ({run.error[:200]})"
        out.append(
            f"  {run.label:<8} {run.seconds:>7.1f} {run.peak_bytes / MIB:>13,.0f} "
            f"{server:>15}  {state}"
        )
    out.append("")
    columns = "".join(f" {run.label + ' tot/exc':>22}" for run in result.runs)
    out.append(f"  {'category':<28} {'planted':>9}{columns}")
    for category in Category:
        cells = "".join(
            f" {run.in_totals[str(category)]:>11,}/"
            + (f"{run.in_exceptions[str(category)]:<10,}" if category.is_exception else " " * 10)
            for run in result.runs
        )
        marks = (
            ""
            if all(run.in_totals[str(category)] == expected[category] for run in result.runs)
            else "  <-- differs"
        )
        out.append(f"  {category.value:<28} {expected[category]:>9,}{cells}{marks}")
    unknown = {key for run in result.runs for key in run.in_totals} - {str(c) for c in Category}
    if unknown:
        out.append(f"  categories not in Category: {sorted(unknown)}")
    out.append("")
    for run in result.runs:
        out.append(f"  {verdict(run.found_planted(expected))}  {run.label}: planted = found")
        out.append(
            f"  {verdict(run.seconds < GOAL_SECONDS)}  {run.label}: under {GOAL_SECONDS:.0f} s "
            f"({run.seconds:.1f} s)"
        )
        out.append(
            f"  {verdict(run.peak_bytes < GOAL_BYTES)}  {run.label}: under 1 GiB "
            f"(reconciling process peak RSS {run.peak_bytes / MIB:,.0f} MiB)"
        )
    if len(result.runs) == len(RUNS):
        rerun = result.runs[-1]
        out.append(f"  {verdict(rerun.opened == 0)}  re-run opened no exception ({rerun.opened})")
    for run in result.runs:
        out.append("")
        out.append(
            f"  {run.label}: {run.measured['statements']} statements, "
            f"{run.measured['sql_seconds']:.1f} s in SQL; slowest:"
        )
        for statement in run.measured["slowest"]:
            out.append(f"    {statement['seconds']:>7.2f} s  {statement['sql'][:160]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/reconcile", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="both")
    parser.add_argument("--lines", type=int, default=None, help=f"default {LINES:,}")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES:,} lines")
    parser.add_argument("--per-category", type=int, default=PER_CATEGORY)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=TIME_LIMIT,
        help="seconds a run may take before it is stopped (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON too")
    args = parser.parse_args()
    lines = args.lines or (QUICK_LINES if args.quick else LINES)
    plan = Plan(lines, args.per_category, args.seed, NOW, NOW - PERIOD)
    print(
        f"bench/reconcile: {lines:,} ledger lines, {args.per_category} planted per category, "
        f"seed {args.seed}; {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}",
        flush=True,
    )
    kinds = DATABASES if args.db == "both" else (args.db,)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="otacm-bench-recon-") as scratch:
        for kind in kinds:
            results.append(bench_database(kind, plan, Path(scratch), args.time_limit))
    print()
    for result in results:
        print("\n".join(report(result)))
        print()
    if args.out is not None:
        args.out.write_text(json.dumps([as_dict(result) for result in results], indent=2))
    return 0 if all(result.valid() for result in results) else 1


def as_dict(result: Result) -> dict[str, Any]:
    """One database's figures, for ``--out``."""
    return {
        "database": result.database,
        "setup_error": result.setup_error,
        "load_seconds": result.load_seconds,
        "rows": dict(result.loaded.rows) if result.loaded else None,
        "planted": (
            {str(k): v for k, v in result.loaded.expected.items()} if result.loaded else None
        ),
        "runs": [
            {
                "label": run.label,
                **run.measured,
                "server_peak_pss_bytes": run.server_peak_bytes,
                "state": run.state,
                "error": run.error,
                "found_in_totals": dict(run.in_totals),
                "found_in_exceptions": dict(run.in_exceptions),
                "opened": run.opened,
            }
            for run in result.runs
        ],
        "goal_seconds": GOAL_SECONDS,
        "goal_bytes": GOAL_BYTES,
        "tolerance": str(Decimal(Settings().recon_amount_tolerance)),
    }


if __name__ == "__main__":
    sys.exit(main())
