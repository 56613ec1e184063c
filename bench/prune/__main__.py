"""bench/prune: how long pruning takes, and how long each of its transactions holds.

Run it as ``.venv/bin/python bench/prune [--db sqlite|postgresql|both] [--inbox N]
[--orders N] [--shop-orders N]`` from the repository (``bench/README.md``). It is a
benchmark, not a test: it measures and prints.

For each database (a fresh SQLite file; a throwaway PostgreSQL server, as the other
benchmarks use), migrated: ``--inbox`` processed notifications and ``--orders`` orders of
four status changes each (Submitted, Processing, Issued, Cancelled), all 300 days old,
the first ``--shop-orders`` of them with two events to the shop (Issued, Cancelled), each
delivered to one endpoint then (the second, each order's newest, stays, emptied); then
:func:`heartbeat.retention.prune` with the default retention, to the end: first with the
shop's events kept (``base``: the notifications and status changes), then the shop's
events alone (``shop``). Printed per stage: the rows each table lost, the wall time and
rows per second (the shop's against the base's, in the same run), and the transactions'
durations (median, p99, longest: on SQLite, how long a webhook beside it could wait for
the write lock).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent / "ingest"))
sys.path.insert(1, str(HERE.parents[1]))

import sqlalchemy as sa  # noqa: E402
from servers import DatabaseFactory, server_for  # noqa: E402

from heartbeat.retention import BATCH, PruneReport, Retention, prune  # noqa: E402
from storage.engine import make_engine, make_sessions  # noqa: E402
from storage.migrate import upgrade  # noqa: E402
from storage.models import Inbox, StatusChange, VenueOrder, ensure_connection  # noqa: E402
from storage.records import ShopDelivery, ShopEvent  # noqa: E402

NOW = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=300)
STATUSES = ("Submitted", "Processing", "Issued", "Cancelled")


def fill(
    sessions: sa.orm.sessionmaker[sa.orm.Session], inbox: int, orders: int, shop_orders: int
) -> None:
    """The old rows pruning deletes (notifications) or cuts (each order's middle steps)."""
    with sessions.begin() as session:
        connection_id = ensure_connection(session, "bench")
        session.execute(
            sa.insert(Inbox),
            [
                {
                    "connection_id": connection_id,
                    "source": "webhook",
                    "event_name": "ota_cm_order_processed",
                    "received_at": OLD,
                    "payload": {"n": number},
                    "dedup_key": f"{number:020d}",
                    "state": "done",
                    "attempts": 1,
                    "next_attempt_at": OLD + dt.timedelta(seconds=number),
                    "processed_at": OLD + dt.timedelta(seconds=number),
                }
                for number in range(inbox)
            ],
        )
        ids = session.scalars(
            sa.insert(VenueOrder).returning(VenueOrder.id),
            [
                {
                    "connection_id": connection_id,
                    "order_id": f"00000000-0000-4000-8000-{number:012d}",
                    "partner_id": "bench",
                    "sell_to_order_reference": f"R-{number}",
                    "reference_key": f"R-{number}",
                    "status": "Cancelled",
                    "status_changed_at": OLD,
                    "first_seen_at": OLD,
                }
                for number in range(orders)
            ],
        ).all()
        session.execute(
            sa.insert(StatusChange),
            [
                {
                    "venue_order_id": order,
                    "status": status,
                    "observed_at": OLD + dt.timedelta(seconds=position, hours=step),
                    "source": "feed",
                }
                for step, status in enumerate(STATUSES)
                for position, order in enumerate(ids)
            ],
        )
        events = session.execute(
            sa.insert(ShopEvent).returning(ShopEvent.id, ShopEvent.created_at),
            [
                {
                    "event_id": f"msg_{seq}{position:031x}",
                    "connection_id": connection_id,
                    "venue_order_id": order,
                    "order_seq": seq,
                    "type": event_type,
                    "payload": {"orderId": str(order), "items": [{"wallets": [{"name": "A"}]}]},
                    "created_at": OLD + dt.timedelta(seconds=position, hours=seq),
                }
                for seq, event_type in ((1, "order.issued"), (2, "order.cancelled"))
                for position, order in enumerate(ids[:shop_orders])
            ],
        ).all()
        session.execute(
            sa.insert(ShopDelivery),
            [
                {
                    "shop_event_id": event_id,
                    "connection_id": connection_id,
                    "endpoint": "shop",
                    "order_seq": 1,
                    "state": "delivered",
                    "attempts": 1,
                    "next_attempt_at": created_at,
                    "retry_from": created_at,
                    "delivered_at": created_at + dt.timedelta(milliseconds=200),
                }
                for event_id, created_at in events
            ],
        )


def bench(kind: str, inbox: int, orders: int, shop_orders: int, scratch: Path) -> list[str]:
    """Fill one database, prune it, and say how it went: first the notifications and the
    status changes (the shop's events kept), then the shop's events alone."""
    with server_for(kind) as server:
        url = DatabaseFactory(kind, scratch, server).new("bench_prune")
        upgrade(url)
        engine = make_engine(url)
        try:
            sessions = make_sessions(engine)
            fill(sessions, inbox, orders, shop_orders)
            if kind == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.exec_driver_sql("VACUUM ANALYZE")
            held: list[float] = []
            began: dict[int, float] = {}
            sa.event.listen(
                engine, "begin", lambda c: began.__setitem__(id(c), time.perf_counter())
            )
            sa.event.listen(
                engine, "commit", lambda c: held.append(time.perf_counter() - began.pop(id(c)))
            )
            lines = []
            base_rate = 0.0
            for stage, shop_days in (("base", 0), ("shop", 30)):
                held.clear()
                retention = Retention(30, 90, 180, shop_event_days=shop_days)
                started = time.perf_counter()
                report = prune(sessions, now=NOW, retention=retention, max_batches=None)
                took = time.perf_counter() - started
                rate = report.rows / took
                line = _describe(f"{kind} {stage}", report, took, sorted(held))
                if base_rate:
                    line += f"; rows/s {rate / base_rate:.2f}x the base's"
                base_rate = base_rate or rate
                lines.append(line)
        finally:
            engine.dispose()
    return lines


def _describe(name: str, report: PruneReport, took: float, held: list[float]) -> str:
    rows = ", ".join(f"{table.table} {table.rows:,}" for table in report.tables if table.rows)
    ms = [1000 * held[int(len(held) * share)] for share in (0.5, 0.99)]
    return (
        f"{name}: pruned {rows} in {took:.1f} s ({report.rows / took:,.0f} rows/s); "
        f"{len(held)} transactions of {BATCH} rows: median {ms[0]:.0f} ms, "
        f"p99 {ms[1]:.0f} ms, longest {1000 * held[-1]:.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/prune", description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--inbox", type=int, default=100_000)
    parser.add_argument("--orders", type=int, default=25_000)
    parser.add_argument("--shop-orders", type=int, default=25_000)
    args = parser.parse_args()
    kinds = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="otacm-bench-prune-") as scratch:
        for kind in kinds:
            for line in bench(kind, args.inbox, args.orders, args.shop_orders, Path(scratch)):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
