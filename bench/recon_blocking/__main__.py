"""bench/recon_blocking: how long the connection's new orders and sales wait during a run.

Run it as ``.venv/bin/python bench/recon_blocking [--db sqlite|postgresql|both]
[--lines N] [--stale N] [--quick] [--out results.json]`` from the repository
(``bench/README.md``).
It is a benchmark, not a test: it measures and prints.

For each database (a fresh SQLite file; a throwaway PostgreSQL server,
``bench/ingest/servers.py``), the seeded ledger and mirror of ``bench/reconcile``
(:mod:`dataset`) is loaded (not measured), with ``--stale`` open exceptions of the
period that the run will not find again, so that it closes them all (as a year's first
run after a long outage would: its write grows with them), then:

1. **idle**: a prober stores :data:`IDLE_PROBES` mirrored orders and ledger lines of the
   connection, each in a transaction of its own, with nothing else running: the baseline.
2. **during**: :func:`reconciler.engine.reconcile` of the period runs in a thread while
   the prober keeps storing one order, then one ledger line, until the run has ended.

Printed per database: the run's wall time (on SQLite, its longest write transaction:
how long it held the database's one write lock); per kind of insert, how many were stored
while the run went on, the longest and the median wait, failures (e.g. SQLite's
``database is locked``), and the longest wait's ratio to the idle baseline's longest.
A reconciliation that blocks nothing keeps that ratio near 1; one that holds a lock the
inserts need makes the longest wait about as long as the run. Exit status: 0 when every
run finished, 1 otherwise or when a database could not be set up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The data set is bench/reconcile's, the PostgreSQL starter bench/ingest's; one copy each.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(HERE.parent / "reconcile"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from dataset import PARTNERS, Plan, load  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, postgresql_server  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from otacm.settings import Settings  # noqa: E402
from reconciler.engine import reconcile  # noqa: E402
from storage.engine import SQLITE_BEGIN_OPTION, make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import LedgerLine, LedgerSource, LedgerState, VenueOrder  # noqa: E402
from storage.records import ReconRun, ReconRunState, ReconTrigger  # noqa: E402
from storage.types import UTCDateTime  # noqa: E402
from venue.models import OrderStatus  # noqa: E402

DATABASES = ("sqlite", "postgresql")
LINES, QUICK_LINES = 1_000_000, 50_000
PER_CATEGORY = 100
SEED = 20260527
NOW = dt.datetime(2026, 5, 27, 12, 0, tzinfo=dt.UTC)
PERIOD = dt.timedelta(days=7)
IDLE_PROBES = 50
WARM_UP = 5
KINDS = ("order", "ledger line")


@dataclass
class Waits:
    """The waits of one kind of insert in one phase."""

    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    longest_at: float = 0.0
    """When the longest wait began, in seconds since the phase began."""

    @property
    def longest(self) -> float:
        return max(self.seconds, default=0.0)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else 0.0


@dataclass
class Result:
    """One database's figures."""

    database: str
    run_seconds: float = 0.0
    run_error: str | None = None
    run_write_seconds: list[float] = field(default_factory=list)
    """SQLite: each of the run's write transactions, from ``BEGIN IMMEDIATE`` to its end."""
    idle: dict[str, Waits] = field(default_factory=lambda: {k: Waits() for k in KINDS})
    during: dict[str, Waits] = field(default_factory=lambda: {k: Waits() for k in KINDS})
    setup_error: str | None = None


class Prober:
    """Stores one mirrored order or one ledger line of the connection per call, timed."""

    def __init__(self, sessions: sessionmaker[Session], connection_id: int) -> None:
        self._sessions = sessions
        self._connection_id = connection_id
        self._count = 0
        # Outside the run's period: the probes do not change what the run finds.
        self._at = NOW + dt.timedelta(days=1)

    def _order(self, session: Session, reference: str) -> None:
        session.add(
            VenueOrder(
                connection_id=self._connection_id,
                order_id=str(uuid.uuid4()),
                partner_id=PARTNERS[0],
                sell_to_order_reference=reference,
                status=OrderStatus.SUBMITTED,
                status_changed_at=self._at,
                received_at=self._at,
                first_seen_at=self._at,
                items=[],
            )
        )

    def _line(self, session: Session, reference: str) -> None:
        session.add(
            LedgerLine(
                connection_id=self._connection_id,
                partner_id=PARTNERS[0],
                shop_reference=reference,
                sold_at=self._at,
                quantity=1,
                amount=Decimal("10.00"),
                currency="EUR",
                state=LedgerState.ACTIVE,
                source=LedgerSource.IMPORT,
            )
        )

    def probe(self, kind: str, into: Waits, since: float = 0.0) -> None:
        """Store one row of ``kind`` in a transaction of its own; record its wait.

        ``since`` is when the phase began (``time.perf_counter()``).
        """
        self._count += 1
        add: Callable[[Session, str], None] = self._order if kind == "order" else self._line
        started = time.perf_counter()
        try:
            with self._sessions.begin() as session:
                add(session, f"PROBE-{self._count}")
        except sa.exc.SQLAlchemyError as exc:
            into.failures.append(type(exc.orig or exc).__name__ if hasattr(exc, "orig") else "")
        waited = time.perf_counter() - started
        if waited > into.longest:
            into.longest_at = started - since
        into.seconds.append(waited)


def plant_stale(engine: sa.Engine, connection_id: int, plan: Plan, count: int) -> None:
    """``count`` open exceptions of the period, of an earlier run, that no sale has."""
    if count <= 0:
        return
    with engine.begin() as connection:
        run_id = connection.execute(
            sa.insert(ReconRun)
            .values(
                connection_id=connection_id,
                started_at=plan.period_from,
                finished_at=plan.period_from,
                period_from=plan.period_from,
                period_to=plan.period_to,
                trigger=ReconTrigger.MANUAL,
                state=ReconRunState.FINISHED,
            )
            .returning(ReconRun.id)
        ).scalar_one()
        connection.execute(
            sa.text(
                """
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
                INSERT INTO recon_exception (
                    connection_id, category, subject_key, subject_at, currency, state,
                    first_seen_run_id, last_seen_run_id, first_seen_at, updated_at
                )
                SELECT :connection_id, 'missing_at_venue', 'ledger:stale:' || CAST(i AS TEXT),
                       :at, 'EUR', 'open', :run_id, :run_id, :at, :at
                FROM n
                """
            ).bindparams(sa.bindparam("at", type_=UTCDateTime())),
            {
                "count": count,
                "connection_id": connection_id,
                "run_id": run_id,
                "at": plan.period_from + (plan.period_to - plan.period_from) / 2,
            },
        )


def bench_database(kind: str, plan: Plan, scratch: Path, stale: int = 0) -> Result:
    """Load, probe idle, then probe during one reconciliation."""
    result = Result(kind)
    try:
        server_context = postgresql_server() if kind == "postgresql" else None
        server = server_context.__enter__() if server_context is not None else None
        try:
            url = DatabaseFactory(kind, scratch, server).new("bench_recon_blocking")
            upgrade(url)
            engine = make_engine(url)
            try:
                loaded = load(engine, plan)
                plant_stale(engine, loaded.connection_id, plan, stale)
                sessions = make_sessions(engine)
                prober = Prober(sessions, loaded.connection_id)
                for _ in range(WARM_UP):  # the pool's first connections, the ORM's caches
                    prober.probe("order", Waits())
                for _ in range(IDLE_PROBES):
                    for probe_kind in KINDS:
                        prober.probe(probe_kind, result.idle[probe_kind])
                _during(result, sessions, prober, plan, loaded.connection_id)
            finally:
                engine.dispose()
        finally:
            if server_context is not None:
                server_context.__exit__(None, None, None)
    except BenchSetupError as exc:
        result.setup_error = str(exc)
    return result


def _during(
    result: Result,
    sessions: sessionmaker[Session],
    prober: Prober,
    plan: Plan,
    connection_id: int,
) -> None:
    settings = Settings()
    started = threading.Event()

    def run() -> None:
        began = time.perf_counter()
        started.set()
        try:
            reconcile(
                sessions,
                connection_id=connection_id,
                period_from=plan.period_from,
                period_to=plan.period_to,
                now=plan.now,
                trigger=ReconTrigger.MANUAL,
                actor=None,
                grace=dt.timedelta(seconds=settings.recon_grace),
                tolerance=Decimal(settings.recon_amount_tolerance),
            )
        except Exception as exc:  # printed in the report
            result.run_error = f"{type(exc).__name__}: {exc}"[:300]
        result.run_seconds = time.perf_counter() - began

    runner = threading.Thread(target=run)
    _time_write_transactions(sessions, runner, result.run_write_seconds)
    runner.start()
    started.wait()
    since = time.perf_counter()
    while runner.is_alive():
        for probe_kind in KINDS:
            prober.probe(probe_kind, result.during[probe_kind], since)
    runner.join()


def _time_write_transactions(
    sessions: sessionmaker[Session], runner: threading.Thread, into: list[float]
) -> None:
    """On SQLite, record how long each write transaction of ``runner``'s thread lasts."""
    engine: sa.Engine = sessions.kw["bind"]
    if engine.dialect.name != "sqlite":
        return
    began: dict[int, float] = {}

    def begin(connection: sa.Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        if threading.current_thread() is runner and str(mode).upper() != "DEFERRED":
            began[id(connection)] = time.perf_counter()

    def end(connection: sa.Connection) -> None:
        if (started := began.pop(id(connection), None)) is not None:
            into.append(time.perf_counter() - started)

    sa.event.listen(engine, "begin", begin)
    sa.event.listen(engine, "commit", end)
    sa.event.listen(engine, "rollback", end)


def report(result: Result) -> list[str]:
    """The printed section for one database."""
    out = [f"== {result.database} =="]
    if result.setup_error is not None:
        out.append(f"  VOID  could not run: {result.setup_error}")
        return out
    state = "finished" if result.run_error is None else f"failed ({result.run_error})"
    out.append(f"  reconciliation: {result.run_seconds:.2f} s, {state}")
    if result.run_write_seconds:
        out.append(
            f"  its write transactions: {len(result.run_write_seconds)}, longest "
            f"{max(result.run_write_seconds) * 1000:.1f} ms (SQLite's write lock held)"
        )
    out.append(
        f"  {'insert':<12} {'idle max ms':>12} {'during: n':>10} {'median ms':>10}"
        f" {'max ms':>9} {'at s':>6} {'failed':>7} {'max/idle max':>13}"
    )
    for kind in KINDS:
        idle, during = result.idle[kind], result.during[kind]
        ratio = during.longest / idle.longest if idle.longest else float("nan")
        out.append(
            f"  {kind:<12} {idle.longest * 1000:>12.1f} {len(during.seconds):>10}"
            f" {during.median * 1000:>10.1f} {during.longest * 1000:>9.1f}"
            f" {during.longest_at:>6.1f}"
            f" {len(during.failures):>7} {ratio:>12.1f}x"
        )
    return out


def as_dict(result: Result) -> dict[str, Any]:
    """One database's figures, for ``--out``."""
    return {
        "database": result.database,
        "setup_error": result.setup_error,
        "run_seconds": result.run_seconds,
        "run_error": result.run_error,
        "run_write_seconds": result.run_write_seconds,
        **{
            f"{phase}_{kind.replace(' ', '_')}": {
                "count": len(waits.seconds),
                "longest_seconds": waits.longest,
                "median_seconds": waits.median,
                "longest_began_at_seconds": waits.longest_at,
                "failures": waits.failures,
            }
            for phase, table in (("idle", result.idle), ("during", result.during))
            for kind, waits in table.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/recon_blocking", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--db", choices=(*DATABASES, "both"), default="both")
    parser.add_argument("--lines", type=int, default=None, help=f"default {LINES:,}")
    parser.add_argument(
        "--stale", type=int, default=0, help="open exceptions the run closes (default 0)"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LINES:,} lines")
    parser.add_argument("--out", type=Path, help="write the results as JSON too")
    args = parser.parse_args()
    lines = args.lines or (QUICK_LINES if args.quick else LINES)
    plan = Plan(lines, PER_CATEGORY, SEED, NOW, NOW - PERIOD)
    print(
        f"bench/recon_blocking: {lines:,} ledger lines, {args.stale:,} stale exceptions; "
        f"{platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        flush=True,
    )
    kinds = DATABASES if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="otacm-bench-recon-blocking-") as scratch:
        results = [bench_database(kind, plan, Path(scratch), args.stale) for kind in kinds]
    print()
    for result in results:
        print("\n".join(report(result)))
        print()
    if args.out is not None:
        args.out.write_text(json.dumps([as_dict(result) for result in results], indent=2))
    ok = all(r.setup_error is None and r.run_error is None for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
