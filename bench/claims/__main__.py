"""bench/claims: what a 50-row claim of the inbox and the outbox costs as their history grows.

Run it as ``.venv/bin/python bench/claims [--db sqlite|postgresql|both] [--sizes 10000,...]
[--quick] [--claims K] [--scenario history|backlog|both]`` from the repository
(``bench/README.md``). It is a benchmark, not a test: it measures and prints; the goal
is a claim that costs the same at every size.

For each database (a fresh SQLite file; a throwaway PostgreSQL server with production's
durability, ``bench/ingest/servers.py``), size N and scenario, a freshly migrated
database is filled in bulk SQL (one ``INSERT ... SELECT`` per table; PostgreSQL is then
``VACUUM ANALYZE``\\d, as autovacuum would) with, in both ``inbox`` and ``outbox``:

- **history**: N finished rows (inbox ``done``, outbox ``sent``) and 2,000 pending ones
  after them, due: a normal day after a long history;
- **backlog**: N/2 finished rows and N/2 pending ones after them: draining after an
  outage.

Then the worker's claim (:func:`orders.worker.claim_batch`, filtered by connection as
:func:`orders.worker.run_once` does) and the sender's (:func:`orders.outbox.claim_outbox`,
filtered by connection as :func:`orders.sender.run_outbox_once` does; each pending row's
order has a sent row before it, so "an earlier row for the same order is unfinished" is
looked up for each) each lease 50 rows, K times (after one untimed claim). Printed per
line: the median milliseconds of a claim, its ratio to the smallest size's in the same
run, and the plan of the claim's query (the indexes it reads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, postgresql_server  # noqa: E402

from orders.outbox import claim_outbox  # noqa: E402
from orders.worker import claim_batch  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import ensure_connection  # noqa: E402
from storage.types import UTCDateTime  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
SCENARIOS = ("history", "backlog")
HISTORY_PENDING = 2_000
"""Pending rows beside a history of N finished ones: room for every timed claim."""
CLAIMS = 20
BATCH = 50
LEASE_SECONDS = 600.0
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
FINISHED_AT = NOW - dt.timedelta(days=30)

# A row number, counted from 1, as the SQL dialect generates it; each fill is one
# statement over it. SQLite's generate_series is an extension Python's build lacks.
_NUMBERS = {
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT :first UNION ALL SELECT i + 1 FROM n "
    "WHERE i < :last) ",
    "postgresql": "WITH n(i) AS (SELECT generate_series(CAST(:first AS bigint), "
    "CAST(:last AS bigint))) ",
}
_TEXT = {"sqlite": "printf('%020d', {})", "postgresql": "lpad(({})::text, 20, '0')"}

_INBOX = """INSERT INTO inbox (connection_id, source, event_name, order_id, notified_status,
    notified_at, received_at, payload, dedup_key, state, attempts, next_attempt_at,
    processed_at)
SELECT :connection, 'webhook', 'orderStatusChanged', {order}, 'Issued', :at, :at,
    '{{"eventName":"orderStatusChanged"}}', {key} || {key}, :state, :attempts, :at, :done_at
FROM n"""

_OUTBOX = """INSERT INTO outbox (connection_id, operation, state, attempts, next_attempt_at,
    order_id, created_at, sent_at)
SELECT :connection, :operation, :state, :attempts, :at, {order}, :at, :done_at
FROM n"""


@dataclass(frozen=True)
class Figure:
    """The median claim time of one queue at one size and scenario."""

    database: str
    scenario: str
    queue: str
    size: int
    milliseconds: float
    plan: str


def fill(engine: sa.Engine, connection_id: int, finished: int, pending: int) -> None:
    """Write ``finished`` done/sent rows, then ``pending`` due ones, in each queue.

    Row ``i`` of either part is about order ``i``: each pending outbox row's order has a
    sent row before it (the create), so the claim's "waits its turn" check finds history.
    """
    dialect = engine.dialect.name
    numbers, text = _NUMBERS[dialect], _TEXT[dialect]
    order = text.format("i")
    key = text.format("i + :offset")
    inbox = sa.text(numbers + _INBOX.format(order=order, key=key)).bindparams(
        sa.bindparam("at", type_=UTCDateTime()), sa.bindparam("done_at", type_=UTCDateTime())
    )
    outbox = sa.text(numbers + _OUTBOX.format(order=order)).bindparams(
        sa.bindparam("at", type_=UTCDateTime()), sa.bindparam("done_at", type_=UTCDateTime())
    )
    parts = [(finished, "done", "sent", 1, FINISHED_AT, FINISHED_AT, 0)]
    parts.append((pending, "pending", "pending", 0, NOW - dt.timedelta(minutes=1), None, finished))
    with engine.begin() as connection:
        for count, inbox_state, outbox_state, attempts, at, done_at, offset in parts:
            if not count:
                continue
            common = {"first": 1, "last": count, "connection": connection_id, "at": at}
            common |= {"attempts": attempts, "done_at": done_at}
            connection.execute(inbox, common | {"state": inbox_state, "offset": offset})
            operation = "create" if inbox_state == "done" else "confirm"
            connection.execute(outbox, common | {"state": outbox_state, "operation": operation})
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE inbox")
            connection.exec_driver_sql("VACUUM ANALYZE outbox")


def plan_of(engine: sa.Engine, claim: Callable[[], object]) -> str:
    """The indexes the claim's SELECT reads, from the database's own EXPLAIN."""
    captured: list[tuple[str, object]] = []

    def capture(
        conn: object, cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not captured:
            captured.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        claim()
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    statement, parameters = captured[0]
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(explain + statement, parameters).all()  # type: ignore[arg-type]
    if engine.dialect.name == "sqlite":
        return " | ".join(str(row[-1]) for row in rows)
    # PostgreSQL's plan nodes, without their costs: what is scanned, sorted or locked.
    nodes = (str(row[0]).split("  (cost=")[0].strip(" ->") for row in rows)
    return " | ".join(node for node in nodes if "Scan" in node or "Sort" in node)


def measure(url: str, database: str, scenario: str, size: int, claims: int) -> list[Figure]:
    """Fill a new database for ``size`` and ``scenario``, and time both queues' claims."""
    upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_sessions(engine)
        with sessions.begin() as session:
            connection_id = ensure_connection(session, "bench")
        finished, pending = (size, HISTORY_PENDING) if scenario == "history" else (size // 2,) * 2
        fill(engine, connection_id, finished, pending)
        scope = {connection_id}
        queues: dict[str, Callable[[str], object]] = {
            "inbox": lambda owner: claim_batch(
                sessions, owner=owner, now=NOW, limit=BATCH, lease_seconds=LEASE_SECONDS,
                connection_ids=scope, max_attempts=8,
            ),
            "outbox": lambda owner: claim_outbox(
                sessions, owner=owner, now=NOW, limit=BATCH, lease_seconds=LEASE_SECONDS,
                connection_ids=scope, max_attempts=8,
            ),
        }  # fmt: skip
        figures = []
        for queue, claim in queues.items():
            plan = plan_of(engine, partial(claim, "bench-plan"))
            times = []
            for number in range(claims):
                started = time.perf_counter()
                taken = claim(f"bench-{number}")
                times.append(time.perf_counter() - started)
                if not taken:
                    raise BenchSetupError(f"{database} {queue}: a claim found no due row")
            median = statistics.median(times) * 1000
            figures.append(Figure(database, scenario, queue, size, median, plan))
        return figures
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a line per figure and a table at the end."""
    parser = argparse.ArgumentParser(prog="bench/claims", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=[*DATABASES, "both"], default="both")
    parser.add_argument("--sizes", help="comma-separated row counts (default 10k,100k,1M)")
    parser.add_argument("--quick", action="store_true", help="10k and 100k only")
    parser.add_argument("--claims", type=int, default=CLAIMS, help="timed claims per figure")
    parser.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    arguments = parser.parse_args(argv)
    if arguments.sizes:
        sizes = tuple(int(size.replace("_", "")) for size in arguments.sizes.split(","))
    else:
        sizes = QUICK_SIZES if arguments.quick else SIZES
    databases = DATABASES if arguments.db == "both" else (arguments.db,)
    scenarios = SCENARIOS if arguments.scenario == "both" else (arguments.scenario,)

    figures: list[Figure] = []
    try:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="claims-")))
            for database in databases:
                server = stack.enter_context(postgresql_server()) if database != "sqlite" else None
                factory = DatabaseFactory(database, directory, server)
                for scenario in scenarios:
                    for size in sizes:
                        url = factory.new(f"claims_{scenario}_{size}")
                        started = time.perf_counter()
                        for figure in measure(url, database, scenario, size, arguments.claims):
                            figures.append(figure)
                            print(f"{database:10} {scenario:8} {figure.queue:6} {size:>10,}  "
                                  f"{figure.milliseconds:9.2f} ms  plan: {figure.plan}",
                                  flush=True)  # fmt: skip
                        print(
                            f"  ({time.perf_counter() - started:.0f} s with the fill)", flush=True
                        )
    except BenchSetupError as exc:
        print(f"bench/claims: {exc}", file=sys.stderr)
        return 1
    print_table(figures, sizes)
    return 0


def print_table(figures: list[Figure], sizes: tuple[int, ...]) -> None:
    """Milliseconds per 50-row claim by size, and each one's ratio to the smallest size."""
    header = "".join(f"{size:>18,}" for size in sizes)
    print(f"\nms per {BATCH}-row claim (ratio to {sizes[0]:,})")
    print(f"{'database':10} {'scenario':8} {'queue':6}{header}")
    keys = sorted({(f.database, f.scenario, f.queue) for f in figures}, key=str)
    for database, scenario, queue in keys:
        row = {f.size: f.milliseconds for f in figures
               if (f.database, f.scenario, f.queue) == (database, scenario, queue)}  # fmt: skip
        base = row.get(sizes[0])
        cells = "".join(
            f"{row[size]:>9.2f} ({row[size] / base:>5.1f}x)"
            if size in row and base
            else f"{'':>18}"
            for size in sizes
        )
        print(f"{database:10} {scenario:8} {queue:6}{cells}")


if __name__ == "__main__":
    sys.exit(main())
