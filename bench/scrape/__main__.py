"""bench/scrape: what a ``/metrics`` scrape, and the job that computes its figures, cost
as the order history grows.

Run it as ``.venv/bin/python bench/scrape [--db sqlite|postgresql|both] [--sizes 10000,...]
[--quick] [--scrapes K]`` from the repository (``bench/README.md``). It is a benchmark,
not a test: it measures and prints; the goal is a scrape under 20 ms at every size.

For each database (a fresh SQLite file; a throwaway PostgreSQL server with production's
durability, ``bench/ingest/servers.py``) and size N, a freshly migrated database is
filled in bulk SQL (one ``INSERT ... SELECT`` per table; PostgreSQL is then ``VACUUM
ANALYZE``\\d, as autovacuum would) with N orders settling at a steady
``--orders-per-day`` (:data:`ORDERS_PER_DAY` by default: then N sets how long the
history is, not how busy a day is; 10k orders are two days, 1M 200), each with three
status changes (Submitted by ``submit``, Processing by ``poll``, Issued by ``webhook``
or, one in five, ``feed``) and the webhook's time on the order; one in a hundred of the
newest 5,000 is left Processing (stuck: in flight are few, whatever the history).

Then, K times each (after one untimed run), the median milliseconds of:

- **scrape**: :class:`receiver.database_metrics.DatabaseCollector` collecting everything
  it serves, as ``GET /metrics`` does, from the figures the job stored;
- **job**: the scheduler's ``metric_figures`` job
  (:func:`heartbeat.metric_figures.refresh_figures`), exact over the 24-hour window;
- **before**: the scrape as it was before the figures moved to the job (the collector
  of commit :data:`BEFORE`, loaded from git), which computed them at each scrape over the
  newest 200,000 status changes. Same database, same schema (with the new index).

Each figure is printed with its ratio to the smallest size's in the same run, and the
number of settled orders the window found (the job's is exact: every order of the last
24 h; the old scrape's is cut once the window holds more than 200,000 changes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
# The PostgreSQL starter is the ingest benchmark's; one copy of it.
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(REPOSITORY))

import sqlalchemy as sa  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from servers import BenchSetupError, DatabaseFactory, postgresql_server  # noqa: E402

from heartbeat.metric_figures import refresh_figures  # noqa: E402
from receiver.database_metrics import DatabaseCollector  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import ensure_connection  # noqa: E402

DATABASES = ("sqlite", "postgresql")
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
SCRAPES = 10
ORDERS_PER_DAY = 5_000
STUCK_AFTER = dt.timedelta(hours=1)
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
BEFORE = "9af2510"
"""The commit whose scrape computed the figures itself."""

# A row number, counted from 1, as the SQL dialect generates it; each fill is one
# statement over it. SQLite's generate_series is an extension Python's build lacks.
_NUMBERS = {
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :last) ",
    "postgresql": "WITH n(i) AS (SELECT generate_series(1, CAST(:last AS bigint))) ",
}


def _ago(dialect: str, base: str, seconds: str) -> str:
    """SQL for the time ``seconds`` (an SQL expression) before ``base`` (a time column or
    parameter), as UTCDateTime stores it on each database."""
    if dialect == "sqlite":
        return (
            f"strftime('%Y-%m-%d %H:%M:%S', {base}, '-' || ({seconds}) || ' seconds') || '.000000'"
        )
    return f"(CAST({base} AS timestamptz) - ({seconds}) * interval '1 second')"


def fill(engine: sa.Engine, connection_id: int, size: int, per_day: int) -> None:
    """Write ``size`` orders, ``per_day`` a day back from ``NOW``, and their status changes."""
    dialect = engine.dialect.name
    spacing = 86_400 / per_day
    now = NOW.strftime("%Y-%m-%d %H:%M:%S") + ("" if dialect == "sqlite" else "+00")
    settled = _ago(dialect, ":now", f"i * {spacing}")
    # The SQL is this module's own text, with numbers: nothing from outside.
    orders = sa.text(
        _NUMBERS[dialect]  # noqa: S608
        + f"""INSERT INTO venue_order (connection_id, order_id, partner_id,
            sell_to_order_reference, reference_key, status, status_changed_at,
            first_seen_at, first_notified_at, updated_at)
        SELECT :connection, 'order-' || i, 'partner', 'SHOP-' || i, 'shop-' || i,
            CASE WHEN i % 100 = 0 AND i <= 5000 THEN 'Processing' ELSE 'Issued' END,
            {settled}, {_ago(dialect, ":now", f"i * {spacing} + 120")},
            {_ago(dialect, ":now", f"i * {spacing} + 3")}, {settled}
        FROM n"""  # noqa: S608
    )
    # In the order otacm writes them: ids follow time, as the old scrape's cap assumed.
    changes = " UNION ALL ".join(
        f"SELECT id AS venue_order_id, {status} AS status, {observed} AS observed_at, "  # noqa: S608
        f"{source} AS source FROM venue_order {where}"
        for status, source, observed, where in (
            ("'Submitted'", "'submit'", _ago(dialect, "status_changed_at", "120"), ""),
            ("'Processing'", "'poll'", _ago(dialect, "status_changed_at", "60"), ""),
            (
                "status",
                "CASE WHEN id - id / 5 * 5 = 0 THEN 'feed' ELSE 'webhook' END",
                "status_changed_at",
                "WHERE status = 'Issued'",
            ),
        )
    )
    with engine.begin() as connection:
        connection.execute(orders, {"last": size, "connection": connection_id, "now": now})
        connection.exec_driver_sql(
            "INSERT INTO status_change (venue_order_id, status, observed_at, source) "  # noqa: S608
            f"SELECT venue_order_id, status, observed_at, source FROM ({changes}) AS c "
            "ORDER BY observed_at"
        )
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE venue_order")
            connection.exec_driver_sql("VACUUM ANALYZE status_change")


def old_metrics() -> ModuleType:
    """The module ``receiver.database_metrics`` as it was at :data:`BEFORE`."""
    source = subprocess.run(
        ["git", "-C", str(REPOSITORY), "show", f"{BEFORE}:receiver/database_metrics.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("database_metrics_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up while they are made.
    sys.modules[spec.name] = module
    exec(compile(source, "database_metrics_before.py", "exec"), module.__dict__)  # noqa: S102
    return module


@dataclass(frozen=True)
class Figure:
    """The median milliseconds of one step at one size, and what it found settled."""

    database: str
    step: str
    size: int
    milliseconds: float
    settled: int


def settled_of(registry: CollectorRegistry) -> int:
    """The orders settled in the window, summed over sources, from an exposition."""
    text = generate_latest(registry).decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "otacm_orders_settled_recent"
        )
    )


def timed(step: Callable[[], object], times: int) -> float:
    """The median milliseconds of ``step``, after one untimed run."""
    step()
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        step()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations) * 1000


def measure(
    url: str, database: str, size: int, per_day: int, scrapes: int, before: ModuleType
) -> list[Figure]:
    """Fill a new database for ``size``; time the scrape, the job and the old scrape."""
    upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_sessions(engine)
        read_sessions = make_sessions(engine, read_only=True)
        with sessions.begin() as session:
            connection_id = ensure_connection(session, "bench")
        fill(engine, connection_id, size, per_day)

        def job() -> None:
            refresh_figures(sessions, read_sessions, now=NOW, stuck_after=STUCK_AFTER)

        new = CollectorRegistry()
        new.register(DatabaseCollector(read_sessions, ["bench"], clock=lambda: NOW))
        old = CollectorRegistry()
        old.register(
            before.DatabaseCollector(
                read_sessions, ["bench"], stuck_after=STUCK_AFTER, clock=lambda: NOW
            )
        )
        job_ms = timed(job, max(scrapes // 2, 3))
        scrape_ms = timed(lambda: generate_latest(new), scrapes)
        before_ms = timed(lambda: generate_latest(old), max(scrapes // 2, 3))
        return [
            Figure(database, "scrape", size, scrape_ms, settled_of(new)),
            Figure(database, "job", size, job_ms, settled_of(new)),
            Figure(database, "before", size, before_ms, settled_of(old)),
        ]
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a line per figure and a table at the end."""
    parser = argparse.ArgumentParser(prog="bench/scrape", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=[*DATABASES, "both"], default="both")
    parser.add_argument("--sizes", help="comma-separated order counts (default 10k,100k,1M)")
    parser.add_argument("--quick", action="store_true", help="10k and 100k only")
    parser.add_argument("--scrapes", type=int, default=SCRAPES, help="timed scrapes per figure")
    parser.add_argument(
        "--orders-per-day", type=int, default=ORDERS_PER_DAY, help="how busy a day is"
    )
    arguments = parser.parse_args(argv)
    if arguments.sizes:
        sizes = tuple(int(size.replace("_", "")) for size in arguments.sizes.split(","))
    else:
        sizes = QUICK_SIZES if arguments.quick else SIZES
    databases = DATABASES if arguments.db == "both" else (arguments.db,)
    before = old_metrics()

    figures: list[Figure] = []
    try:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scrape-")))
            for database in databases:
                server = stack.enter_context(postgresql_server()) if database != "sqlite" else None
                factory = DatabaseFactory(database, directory, server)
                for size in sizes:
                    url = factory.new(f"scrape_{size}")
                    started = time.perf_counter()
                    for figure in measure(
                        url, database, size, arguments.orders_per_day, arguments.scrapes, before
                    ):
                        figures.append(figure)
                        print(f"{database:10} {figure.step:6} {size:>10,}  "
                              f"{figure.milliseconds:9.2f} ms  settled {figure.settled:,}",
                              flush=True)  # fmt: skip
                    print(f"  ({time.perf_counter() - started:.0f} s with the fill)", flush=True)
    except BenchSetupError as exc:
        print(f"bench/scrape: {exc}", file=sys.stderr)
        return 1
    print_table(figures, sizes)
    return 0


def print_table(figures: list[Figure], sizes: tuple[int, ...]) -> None:
    """Milliseconds by size, and each one's ratio to the smallest size."""
    header = "".join(f"{size:>20,}" for size in sizes)
    print(f"\nms (ratio to {sizes[0]:,} orders)")
    print(f"{'database':10} {'step':6}{header}")
    keys = sorted({(f.database, f.step) for f in figures}, key=str)
    for database, step in keys:
        row = {f.size: f.milliseconds for f in figures if (f.database, f.step) == (database, step)}
        base = row.get(sizes[0])
        cells = "".join(
            f"{row[size]:>11.2f} ({row[size] / base:>5.1f}x)"
            if size in row and base
            else f"{'':>20}"
            for size in sizes
        )
        print(f"{database:10} {step:6}{cells}")


if __name__ == "__main__":
    sys.exit(main())
