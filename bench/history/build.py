"""The history ``bench/history`` measures over: a year of one venue connection's orders.

:func:`build` fills a freshly migrated database with N orders over the year before
:data:`NOW` (order ``i``, ``1 <= i <= N``, is the ``i``-th oldest), each with what otacm
keeps of it, written the way a year of running would have left it. The last week holds
the same orders whatever N (:data:`WEEK_ORDERS`, evenly spread), the rest are spread
evenly over the 358 days before it: the week's reconciliation reads the same sales at
every size, and only the history before it grows. Per order:

- the mirror: the order (Issued; every 50th Draft, every 97th Error, the newest few still
  Processing), one item of 1-3 admissions, a wallet per admission, and three status
  changes (Submitted by ``submit``, Processing by ``poll``, its status by ``webhook`` or,
  one in five, ``feed``);
- the inbox: the order's notification, ``done``; then :func:`pending_inbox` due rows of
  orders still to fetch (a normal backlog);
- the ledger: the order's sale, equal to the order (every 200th off by 1.00), except
  every 50th-plus-7 order, which the shop never recorded (an orphan); and N/100 sales
  the venue never got (missing at the venue; in the last week a hundredth of its
  orders' worth, in the year before it the rest);
- the outbox: the create of each recorded sale, ``sent``; a confirm of each recent paid
  Draft order, pending;
- reconciliation: a scheduled run a day (365), each with its totals, the exceptions it
  found (an order's mismatch is opened by the run of its day, seen by the next six, then
  closed) and their events; and one run per entry of :data:`EXCEPTION_RUNS` no larger
  than N, holding exactly that many open exceptions, for the finance pages and exports,
  whose subjects lie in the days before the history's year: outside every period the
  benchmark reconciles (the year, the week), so no measured run reads or closes them.

Every table is one ``INSERT ... SELECT`` over generated row numbers (a recursive CTE on
SQLite, ``generate_series`` on PostgreSQL): the rows never pass through Python, so 1M
orders (about 12M rows) take a minute or two rather than the hour an ORM would. SQLite's
write is one transaction with the WAL folded in after. PostgreSQL's is one transaction
too, with the secondary indexes, unique constraints and foreign keys dropped before the
rows and made again after, exactly as migrated (:mod:`bulk`); then its sequences are moved
past the ids written and every table ``VACUUM ANALYZE``\\d, as autovacuum would. Nothing
here is random: a size builds the same rows on either database, every time.
"""

# Every statement here is this module's own text with numbers and constants in it, nothing
# from outside: S608 (SQL built from strings) has nothing to find.
# ruff: noqa: S608

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import sqlalchemy as sa
from bulk import loading

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
"""The end of the history: every row is older. Before the wall clock, so what the
benchmark adds while it measures (webhooks, the feed's findings) comes after it."""

SPAN_DAYS = 365
SPAN = SPAN_DAYS * 86_400
"""The history's length in seconds: a year."""

CONNECTION = "default"
"""The connection's name: the one otacm's settings give a venue configured from the
environment."""

PARTNERS = (
    "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e",
    "5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4",
)
"""The sandbox's two active partners (``sandbox.config.DEFAULT_PARTNERS``): the history's
orders are theirs, so the feed and the worker against the sandbox find the same ones."""

WEEK = 7 * 86_400
WEEK_ORDERS = 2_000
"""Orders in the history's last week, whatever its size (a fifth of it when smaller)."""

EXCEPTION_RUNS = (100, 100_000, 1_000_000)
"""Exceptions of the runs the finance pages and exports are measured on."""

VERSION = 2
"""The builder's version, kept with a cached history: a history built by another
version is built again."""

_NUMBERS = {
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {last}) ",
    "postgresql": "WITH n(i) AS (SELECT generate_series(1, CAST({last} AS bigint))) ",
}


@dataclass(frozen=True)
class History:
    """What a built history holds, as the measurements need it.

    Attributes:
        orders: N, the orders of the history.
        exception_runs: the id of the run holding each count of exceptions.
        pending_inbox: due inbox rows.
        rows: rows written per table.
    """

    orders: int
    exception_runs: dict[int, int]
    pending_inbox: int
    rows: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        """For the cache's metadata."""
        return {
            "orders": self.orders,
            "exception_runs": {str(k): v for k, v in self.exception_runs.items()},
            "pending_inbox": self.pending_inbox,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> History:
        """The inverse of :meth:`as_dict`."""
        runs = data["exception_runs"]
        rows = data["rows"]
        assert isinstance(runs, dict) and isinstance(rows, dict)
        return cls(
            orders=int(str(data["orders"])),
            exception_runs={int(k): int(v) for k, v in runs.items()},
            pending_inbox=int(str(data["pending_inbox"])),
            rows={str(k): int(v) for k, v in rows.items()},
        )


def week_orders(orders: int) -> int:
    """The orders of a history of ``orders`` that lie in its last week."""
    return min(WEEK_ORDERS, orders // 5)


def spread(index: str, count: int, recent: int) -> str:
    """SQL for the age in seconds of item ``index`` (1 the oldest) of ``count`` items of
    which the last ``recent`` are evenly spread over the last week, the others over the
    rest of the year."""
    older = max(count - recent, 1)
    return (
        f"(CASE WHEN {index} > {count - recent} "
        f"THEN ({count} + 1 - {index}) * {WEEK} / {max(recent, 1)} "
        f"ELSE {WEEK} + ({count - recent} + 1 - {index}) * {SPAN - WEEK} / {older} END)"
    )


def pending_inbox(orders: int) -> int:
    """Due inbox rows beside a history of ``orders``: room for the timed claims."""
    return min(2_000, max(orders // 5, 100))


class _Sql:
    """The SQL of one dialect for the fragments every statement shares."""

    def __init__(self, dialect: str, orders: int) -> None:
        self.sqlite = dialect == "sqlite"
        self.dialect = dialect
        self.n = orders
        self.epoch = int(NOW.timestamp())
        self.week = week_orders(orders)
        # Seconds before NOW that order i was received: the last orders over the week,
        # the others over the year before it; integer arithmetic, the same on both
        # databases.
        self.age = spread("i", orders, self.week)

    def numbers(self, last: int | str) -> str:
        return _NUMBERS[self.dialect].format(last=last)

    def at(self, age: str, later: int = 0) -> str:
        """The time ``age`` seconds before NOW, plus ``later`` seconds, as stored."""
        seconds = f"({self.epoch} - {age} + {later})"
        if self.sqlite:
            return f"(datetime({seconds}, 'unixepoch') || '.000000')"
        return f"to_timestamp({seconds})"

    def order_at(self, later: int = 0) -> str:
        return self.at(self.age, later)

    def hex12(self, value: str) -> str:
        return f"printf('%012x', {value})" if self.sqlite else f"lpad(to_hex({value}), 12, '0')"

    def pad8(self, value: str) -> str:
        return f"printf('%08d', {value})" if self.sqlite else f"lpad(({value})::text, 8, '0')"

    def flag(self, value: bool) -> str:
        return str(int(value)) if self.sqlite else str(value).lower()

    def order_guid(self, value: str = "i") -> str:
        return f"('00000000-0000-4000-8000-' || {self.hex12(value)})"

    def partner(self, value: str = "i") -> str:
        return f"(CASE WHEN {value} % 2 = 0 THEN '{PARTNERS[0]}' ELSE '{PARTNERS[1]}' END)"

    def reference(self, value: str = "i") -> str:
        return f"('H-' || {self.pad8(value)})"

    @property
    def in_flight(self) -> int:
        return min(20, max(self.n // 100, 1))

    def status(self) -> str:
        return (
            f"(CASE WHEN i > {self.n - self.in_flight} THEN 'Processing' "
            "WHEN i % 50 = 0 THEN 'Draft' WHEN i % 97 = 0 THEN 'Error' ELSE 'Issued' END)"
        )

    # Money in micro-units (storage.types.Money): a unit price of 5.00-99.99 incl. 21 % VAT.
    CENTS = "(500 + (i * 7919) % 9500)"
    QUANTITY = "(1 + i % 3)"
    UNIT_INCL = f"({CENTS} * 10000)"
    UNIT_EXCL = f"((({CENTS} * 100 + 60) / 121) * 10000)"

    def run_of(self, age: str) -> str:
        """The daily run (1..365) whose day the time ``age`` seconds before NOW is in."""
        day = f"{SPAN_DAYS} - {age} / 86400"
        return f"(CASE WHEN {day} < 1 THEN 1 ELSE {day} END)"


def _statements(sql: _Sql, connection_id: int, runs: dict[int, int]) -> list[tuple[str, int, str]]:
    """Each table's ``INSERT ... SELECT``, parents first: the table it fills, the row
    numbers it reads (``n``: 1 to that; 0 reads none) and the statement."""
    n, yes, no = sql.n, sql.flag(True), sql.flag(False)
    status = sql.status()
    q, incl, excl = sql.QUANTITY, sql.UNIT_INCL, sql.UNIT_EXCL
    final_source = "(CASE WHEN i % 5 = 0 THEN 'feed' ELSE 'webhook' END)"
    pending = pending_inbox(n)
    missing = n // 100
    missing_age = spread("i", missing, min(sql.week // 100, missing))
    recorded = "i % 50 <> 7"
    daily = f"""
        SELECT r, {sql.at(f"(({SPAN_DAYS} - r) * 86400)")} AS day_at,
               {sql.at(f"(({SPAN_DAYS} - r + 7) * 86400)")} AS from_at
        FROM (SELECT i AS r FROM n) AS d"""
    # The category a mismatched order gets, the first rule that applies; NULL: matched.
    category = (
        "(CASE WHEN i % 50 = 7 THEN 'orphan' "
        f"WHEN i > {n - sql.in_flight} THEN NULL "
        "WHEN i % 50 = 0 THEN 'draft_unconfirmed' WHEN i % 97 = 0 THEN 'venue_error' "
        "WHEN i % 200 = 3 THEN 'amount_mismatch' END)"
    )
    first_run = sql.run_of(sql.age)
    statements = [
        (
            "venue_order",
            n,
            f"""INSERT INTO venue_order (id, connection_id, order_id, partner_id,
                sell_to_order_reference, reference_key, buy_from_order_reference, status,
                status_message, status_changed_at, received_at, payment_reference, row_version,
                items_quantity, amount_incl_vat, amount_excl_vat, wallet_currencies,
                first_seen_at, fetched_at, first_notified_at, updated_at)
            SELECT i, {connection_id}, {sql.order_guid()}, {sql.partner()}, {sql.reference()},
                {sql.reference()}, 'VB' || {sql.pad8("i")}, {status},
                CASE WHEN {status} = 'Error' THEN 'Item sold out' END, {sql.order_at(60)},
                {sql.order_at()}, 'PAY-' || {sql.pad8("i")}, 1000 + i, {q}, {incl} * {q},
                {excl} * {q}, 'EUR', {sql.order_at(2)}, {sql.order_at(61)}, {sql.order_at(61)},
                {sql.order_at(61)}
            FROM n""",
        ),
        (
            "order_item",
            n,
            f"""INSERT INTO order_item (id, venue_order_id, line_no, item_number, is_package,
                quantity)
            SELECT i, i, 1, '31001', {no}, {q} FROM n""",
        ),
        (
            "wallet",
            n,
            f"""INSERT INTO wallet (order_item_id, seq_no, wallet_id, wallet_reference_number,
                issued_at, unit_price_excl_vat, unit_price_incl_vat, currency_code)
            SELECT i, k.s, '10000000-0000-4000-8000-' || {sql.hex12("i * 4 + k.s")},
                'W' || {sql.pad8("i")} || '-' || k.s, {sql.order_at(59)}, {excl}, {incl}, 'EUR'
            FROM n JOIN (SELECT 1 AS s UNION ALL SELECT 2 UNION ALL SELECT 3) AS k
                ON k.s <= {q}""",
        ),
        (
            "status_change",
            n,
            f"""INSERT INTO status_change (venue_order_id, status, observed_at, source)
            SELECT i, 'Submitted', {sql.order_at(1)}, 'submit' FROM n
            UNION ALL SELECT i, 'Processing', {sql.order_at(30)}, 'poll' FROM n
            UNION ALL SELECT i, {status}, {sql.order_at(60)}, {final_source} FROM n
                WHERE i <= {n - sql.in_flight}""",
        ),
        (
            "inbox",
            n,
            f"""INSERT INTO inbox (connection_id, source, event_name, order_id,
                buy_from_order_reference, notified_status, notified_at, received_at, payload,
                dedup_key, state, attempts, next_attempt_at, processed_at)
            SELECT {connection_id}, 'webhook', 'ota_cm_order_processed', {sql.order_guid()},
                'VB' || {sql.pad8("i")}, {status}, {sql.order_at(60)}, {sql.order_at(61)},
                '{{"eventName":"ota_cm_order_processed"}}', 'h' || {sql.pad8("i")},
                'done', 1, {sql.order_at(61)}, {sql.order_at(62)}
            FROM n WHERE i <= {n - sql.in_flight}""",
        ),
        (
            "inbox",
            pending,
            f"""INSERT INTO inbox (connection_id, source, event_name, order_id, notified_status,
                notified_at, received_at, payload, dedup_key, state, attempts, next_attempt_at)
            SELECT {connection_id}, 'webhook', 'ota_cm_order_processed',
                {sql.order_guid(f"i + {4 * n}")}, 'Issued', {sql.at("60")}, {sql.at("60")},
                '{{"eventName":"ota_cm_order_processed"}}', 'p' || {sql.pad8("i")}, 'pending',
                0, {sql.at("60")}
            FROM n WHERE i <= {pending}""",
        ),
        (
            "ledger_line",
            n,
            f"""INSERT INTO ledger_line (id, connection_id, partner_id, shop_reference,
                reference_key, sold_at, quantity, amount, currency, amount_includes_vat,
                payment_reference, venue_reference, state, source, created_at, updated_at)
            SELECT i, {connection_id}, {sql.partner()}, lower({sql.reference()}),
                {sql.reference()}, {sql.order_at(-10)}, {q},
                {incl} * {q} + CASE WHEN i % 200 = 3 THEN 1000000 ELSE 0 END, 'EUR', {yes},
                'PAY-' || {sql.pad8("i")}, 'VB' || {sql.pad8("i")}, 'active', 'import',
                {sql.order_at(-10)}, {sql.order_at(-10)}
            FROM n WHERE {recorded}""",
        ),
        (
            "ledger_line",
            missing or -1,  # none below 100 orders
            f"""INSERT INTO ledger_line (id, connection_id, partner_id, shop_reference,
                reference_key, sold_at, quantity, amount, currency, amount_includes_vat,
                state, source, created_at, updated_at)
            SELECT {n} + i, {connection_id}, {sql.partner()}, 'l-' || {sql.pad8("i")},
                'L-' || {sql.pad8("i")}, {sql.at(missing_age)}, 1, 250000000, 'EUR', {yes},
                'active', 'import', {sql.at(missing_age)}, {sql.at(missing_age)}
            FROM n WHERE i <= {missing}""",
        ),
        (
            "outbox",
            n,
            f"""INSERT INTO outbox (connection_id, ledger_line_id, operation, state, attempts,
                next_attempt_at, order_id, created_at, sent_at)
            SELECT {connection_id}, i, 'create', 'sent', 1, {sql.order_at(-10)},
                {sql.order_guid()}, {sql.order_at(-10)}, {sql.order_at(-9)}
            FROM n WHERE {recorded}""",
        ),
        (
            "outbox",
            n,
            f"""INSERT INTO outbox (connection_id, ledger_line_id, operation, state, attempts,
                next_attempt_at, order_id, created_at)
            SELECT {connection_id}, i, 'confirm', 'pending', 0, {sql.order_at(120)},
                {sql.order_guid()}, {sql.order_at(120)}
            FROM n WHERE i % 50 = 0 AND {sql.age} < 86400 AND i <= {n - sql.in_flight}""",
        ),
        (
            "recon_run",
            SPAN_DAYS,
            f"""INSERT INTO recon_run (id, connection_id, started_at, finished_at, period_from,
                period_to, trigger, state)
            SELECT r, {connection_id}, day_at, day_at, from_at, day_at, 'scheduled', 'finished'
            FROM ({daily}) AS runs WHERE r <= {SPAN_DAYS}""",
        ),
        (
            "recon_total",
            SPAN_DAYS,
            f"""INSERT INTO recon_total (recon_run_id, currency, category, count, ledger_amount,
                venue_amount)
            SELECT i, 'EUR', 'matched', {max(n * 7 // SPAN_DAYS, 1)}, 0, 0 FROM n
            WHERE i <= {SPAN_DAYS}""",
        ),
        (
            "recon_exception",
            n,
            f"""INSERT INTO recon_exception (id, connection_id, category, subject_key, subject_at,
                ledger_line_id, venue_order_id, currency, ledger_amount, venue_amount, state,
                first_seen_run_id, last_seen_run_id, closed_run_id, first_seen_at, updated_at)
            SELECT i, {connection_id}, {category},
                CASE WHEN i % 50 = 7 THEN 'order:' || {sql.order_guid()}
                     ELSE 'ledger:' || {sql.partner()} || ':' || {sql.reference()} END,
                {sql.order_at(-10)}, CASE WHEN i % 50 = 7 THEN NULL ELSE i END, i, 'EUR',
                CASE WHEN i % 50 = 7 THEN NULL
                     ELSE {incl} * {q} + CASE WHEN i % 200 = 3 THEN 1000000 ELSE 0 END END,
                {incl} * {q},
                CASE WHEN {first_run} + 6 >= {SPAN_DAYS} THEN 'open' ELSE 'closed' END,
                {first_run},
                CASE WHEN {first_run} + 6 >= {SPAN_DAYS} THEN {SPAN_DAYS} ELSE {first_run} + 6 END,
                CASE WHEN {first_run} + 6 >= {SPAN_DAYS} THEN NULL ELSE {first_run} + 7 END,
                {sql.at(f"(({SPAN_DAYS} - {first_run}) * 86400)")},
                {sql.at(f"(({SPAN_DAYS} - {first_run}) * 86400)")}
            FROM n WHERE {category} IS NOT NULL""",
        ),
        (
            "exception_event",
            0,
            f"""INSERT INTO exception_event (recon_exception_id, recon_run_id, action, at)
            SELECT e.id, e.first_seen_run_id + k.s,
                CASE WHEN k.s = 0 THEN 'opened'
                     WHEN e.first_seen_run_id + k.s <= e.last_seen_run_id THEN 'seen'
                     ELSE 'closed' END,
                e.first_seen_at
            FROM recon_exception AS e
            JOIN (SELECT 0 AS s UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3
                  UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7)
                AS k ON e.first_seen_run_id + k.s <= {SPAN_DAYS}
            WHERE e.id <= {n}""",
        ),
    ]
    next_id = n
    for count, run_id in runs.items():
        statements += [
            (
                "recon_run",
                1,
                f"""INSERT INTO recon_run (id, connection_id, started_at, finished_at,
                    period_from, period_to, trigger, state, actor)
                SELECT {run_id}, {connection_id}, {sql.at("3600")}, {sql.at("3000")},
                    {sql.at(str(SPAN))}, {sql.at("3600")}, 'manual', 'finished', 'bench'
                FROM n WHERE i = 1""",
            ),
            (
                "recon_total",
                1,
                f"""INSERT INTO recon_total (recon_run_id, currency, category, count,
                    ledger_amount, venue_amount)
                SELECT {run_id}, 'EUR', 'amount_mismatch', {count}, {count * 10_000_000},
                    {count * 9_000_000} FROM n WHERE i = 1""",
            ),
            (
                "recon_exception",
                count,
                f"""INSERT INTO recon_exception (id, connection_id, category, subject_key,
                    subject_at, venue_order_id, currency, ledger_amount, venue_amount, details,
                    state, first_seen_run_id, last_seen_run_id, first_seen_at, updated_at)
                SELECT {next_id} + i, {connection_id}, 'amount_mismatch',
                    'bench:{count}:' || i, {sql.at(f"({SPAN} + 86400 + i % 86400)")},
                    (i - 1) % {n} + 1, 'EUR',
                    10000000, 9000000, '{{"note":"planted"}}', 'open', {run_id}, {run_id},
                    {sql.at("((i % 40) * 86400)")}, {sql.at("3000")}
                FROM n""",
            ),
            (
                "exception_event",
                count,
                f"""INSERT INTO exception_event (recon_exception_id, recon_run_id, action, at)
                SELECT {next_id} + i, {run_id}, 'opened', {sql.at("3000")} FROM n""",
            ),
        ]
        next_id += count
    return statements


def exception_runs(orders: int) -> dict[int, int]:
    """The runs holding :data:`EXCEPTION_RUNS` exceptions (no more than ``orders``), by count."""
    counts = [count for count in EXCEPTION_RUNS if count <= max(orders, EXCEPTION_RUNS[0])]
    return {count: SPAN_DAYS + 1 + number for number, count in enumerate(counts)}


def build(engine: sa.Engine, orders: int) -> History:
    """Write a history of ``orders`` orders into ``engine``'s migrated, empty database.

    Returns:
        What was written.
    """
    from storage.models import VenueConnection

    with engine.begin() as connection:
        connection_id = int(
            connection.execute(
                sa.insert(VenueConnection)
                .values(name=CONNECTION, created_at=NOW - dt.timedelta(seconds=SPAN + 86_400))
                .returning(VenueConnection.id)
            ).scalar_one()
        )
    sql = _Sql(engine.dialect.name, orders)
    runs = exception_runs(orders)
    rows: dict[str, int] = {}
    with engine.begin() as connection, ExitStack() as load:
        if sql.sqlite:
            connection.exec_driver_sql("PRAGMA cache_size = -262144")
        else:
            load.enter_context(loading(connection))
        for table, last, statement in _statements(sql, connection_id, runs):
            if last < 0:
                continue
            numbers = sql.numbers(last) if last else ""
            if not sql.sqlite:  # psycopg reads "%" as a placeholder's start; "%%" is modulo
                statement = statement.replace("%", "%%")
            connection.exec_driver_sql(numbers + statement)
            rows[table] = 0
        load.close()  # PostgreSQL's indexes and constraints made again, checked
        for table in rows:
            query = sa.select(sa.func.count()).select_from(sa.table(table))
            rows[table] = int(connection.execute(query).scalar_one())
    _settle(engine, rows)
    return History(orders, runs, pending_inbox(orders), rows)


def _settle(engine: sa.Engine, rows: Mapping[str, int]) -> None:
    """Leave the database as a running deployment would have it after the rows came."""
    if engine.dialect.name == "sqlite":
        # Outside any transaction (otacm's engine begins one on connect): the driver's own.
        raw = engine.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
        finally:
            raw.close()
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in rows:
            # Ids were given explicitly: move the sequences past them, as inserts would.
            connection.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
        connection.exec_driver_sql("VACUUM ANALYZE")
