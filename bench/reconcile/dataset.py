"""The reconciliation benchmark's data: a ledger and a mirror of venue orders, with planted cases.

:func:`plan` decides, from a seed, which ledger lines carry which planted mismatch (a
known number per :class:`~reconciler.categories.Category`); :func:`load` writes the
ledger lines, venue orders, order items and wallets into a freshly migrated database,
at the driver level (``COPY`` on PostgreSQL, ``executemany`` in one transaction on
SQLite), and returns how many of each category a correct engine must find.

Every line ``i`` of the period (``0 <= i < lines``) is a sale of 1-3 admissions of one
item at one unit price, in EUR, GBP or USD, sold between ``period_from`` and two hours
before ``now`` (so past the grace period). Unless it is planted, its venue order matches
it: the same partner and reference (the ledger writes it lower-case, the venue
upper-case), Issued, one item of the same quantity, one wallet per admission priced so
the wallets add up to the ledger amount on the ledger's VAT basis, the same currency, and
the external reference numbers the ledger recorded (when it recorded any, in another
order). Some unplanted lines are *decoys* that a correct engine still calls ``matched``:
the venue reference recorded in another case, an amount off by less than the tolerance,
a sale cancelled in the ledger whose order is Cancelled, an order with no ``receivedAt``,
a sale with no venue reference or external references recorded, amounts excluding VAT.

Beyond the period there are more decoys that must not be reported at all: sales before
``period_from`` with no venue order (they would be ``missing_at_venue``), and venue
orders received before ``period_from`` that no sale has (they would be ``orphan``).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from reconciler.categories import Category
from storage.models import VenueConnection
from venue.values import reference_set_key

CURRENCIES = ("EUR", "GBP", "USD")
PARTNERS = (
    "6f1c2a4e-1b2c-4d3e-8f40-000000000001",
    "6f1c2a4e-1b2c-4d3e-8f40-000000000002",
)
IN_FLIGHT = ("Submitted", "Scheduled", "Processing")
OUTSIDE = 100
"""Sales before the period with no order, and orders before the period with no sale."""
CHUNK = 50_000
"""Rows of ledger lines per write; the orders, items and wallets of those lines go with them."""

LEDGER_COLUMNS = [
    "id",
    "connection_id",
    "partner_id",
    "shop_reference",
    "reference_key",
    "sold_at",
    "quantity",
    "amount",
    "currency",
    "amount_includes_vat",
    "payment_reference",
    "venue_reference",
    "external_reference_numbers",
    "external_references_key",
    "state",
    "source",
    "created_at",
    "updated_at",
]
ORDER_COLUMNS = [
    "id",
    "connection_id",
    "order_id",
    "partner_id",
    "sell_to_order_reference",
    "reference_key",
    "buy_from_order_reference",
    "status",
    "status_message",
    "status_changed_at",
    "received_at",
    "payment_reference",
    "row_version",
    "items_quantity",
    "amount_incl_vat",
    "amount_excl_vat",
    "wallet_currencies",
    "wallet_external_references",
    "removed_at",
    "first_seen_at",
    "fetched_at",
    "updated_at",
]
ITEM_COLUMNS = ["id", "venue_order_id", "line_no", "item_number", "is_package", "quantity"]
WALLET_COLUMNS = [
    "id",
    "order_item_id",
    "seq_no",
    "wallet_id",
    "wallet_reference_number",
    "external_reference_number",
    "unit_price_excl_vat",
    "unit_price_incl_vat",
    "currency_code",
]


@dataclass(frozen=True)
class Plan:
    """What to generate: sizes, the seed, the period and the run's ``now``."""

    lines: int
    per_category: int
    seed: int
    now: dt.datetime
    period_from: dt.datetime

    @property
    def period_to(self) -> dt.datetime:
        return self.now

    def planted(self) -> dict[int, Category]:
        """Which lines of the period carry a planted case, and which (seeded)."""
        ledger_side = [
            category for category in Category if category not in (Category.MATCHED, Category.ORPHAN)
        ]
        needed = len(ledger_side) * self.per_category
        if needed * 2 > self.lines:
            raise ValueError(f"{self.lines} lines are too few for {needed} planted cases")
        chosen = random.Random(self.seed).sample(range(self.lines), needed)
        return {
            line: ledger_side[position // self.per_category] for position, line in enumerate(chosen)
        }


@dataclass
class Loaded:
    """What was written, and what a correct reconciliation of the period must find."""

    connection_id: int
    expected: Counter[Category] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)


class _Writer:
    """Bulk inserts for one database, at the driver level."""

    def __init__(self, dialect: str, driver: Any) -> None:
        self.sqlite = dialect == "sqlite"
        self.driver = driver

    def flag(self, value: bool) -> Any:
        return int(value) if self.sqlite else value

    def write(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        names = ", ".join(columns)
        if self.sqlite:
            marks = ", ".join("?" * len(columns))
            self.driver.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)  # noqa: S608
            return
        with (
            self.driver.cursor() as cursor,
            cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)


def load(engine: sa.Engine, plan: Plan) -> Loaded:
    """Write the plan's ledger and mirror into ``engine``'s (migrated, empty) database.

    Args:
        engine: the database; its schema must be at the latest migration.
        plan: what to write.

    Returns:
        The connection's id, the rows written per table, and the count per category a
        correct reconciliation of ``[plan.period_from, plan.now)`` must report.
    """
    with engine.begin() as connection:
        connection_id = int(
            connection.execute(
                sa.insert(VenueConnection)
                .values(name="bench", created_at=plan.now)
                .returning(VenueConnection.id)
            ).scalar_one()
        )
    loaded = Loaded(connection_id)
    raw = engine.raw_connection()
    try:
        writer = _Writer(engine.dialect.name, raw.driver_connection)
        if writer.sqlite:
            # The load is not measured; the rows are consistent by construction. Foreign
            # keys back on, and the cache back to its size, before the connection is reused.
            writer.driver.execute("PRAGMA foreign_keys = OFF")
            writer.driver.execute("PRAGMA cache_size = -262144")
            writer.driver.execute("BEGIN")
        for table, columns, rows in _rows(plan, connection_id, writer, loaded):
            writer.write(table, columns, rows)
            loaded.rows[table] += len(rows)
        if writer.sqlite:
            writer.driver.execute("COMMIT")
            # Fold the WAL into the database file, outside any transaction. otacm never
            # runs ANALYZE on SQLite, so neither does the benchmark: the planner sees
            # what production sees.
            writer.driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.driver.execute("PRAGMA foreign_keys = ON")
            writer.driver.execute("PRAGMA cache_size = -2000")
        else:
            raw.commit()
    finally:
        raw.close()
    _settle(engine)
    return loaded


def _settle(engine: sa.Engine) -> None:
    """Leave the database as a running deployment would have it after the load."""
    if engine.dialect.name == "sqlite":
        return
    # Ids were given explicitly: move the sequences past them, as inserts would have.
    # VACUUM ANALYZE is what autovacuum does to a table after a bulk load; doing it now
    # keeps autovacuum from running during the measurement.
    tables = ("ledger_line", "venue_order", "order_item", "wallet")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for table in tables:
            connection.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608
                f"(SELECT max(id) FROM {table}))"
            )
        connection.exec_driver_sql(f"VACUUM ANALYZE {', '.join(tables)}")


class _Clock:
    """Timestamps as the database's text, from whole seconds since the epoch.

    ``strftime`` per row would dominate the load; the day's date is formatted once.
    SQLite gets the text SQLAlchemy's DateTime writes (UTC wall time, see
    :class:`~storage.types.UTCDateTime`), so range comparisons against bound parameters
    hold; PostgreSQL parses the same text with a UTC offset.
    """

    def __init__(self, sqlite: bool) -> None:
        self.suffix = "" if sqlite else "+00"
        self.days: dict[int, str] = {}

    def __call__(self, seconds: int | None) -> str | None:
        if seconds is None:
            return None
        day, rest = divmod(seconds, 86_400)
        prefix = self.days.get(day)
        if prefix is None:
            prefix = self.days[day] = (EPOCH + dt.timedelta(days=day)).strftime("%Y-%m-%d")
        hour, rest = divmod(rest, 3600)
        minute, second = divmod(rest, 60)
        return f"{prefix} {hour:02d}:{minute:02d}:{second:02d}.000000{self.suffix}"


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MICROS_PER_CENT = 10_000


def _seconds(moment: dt.datetime) -> int:
    return int((moment - EPOCH).total_seconds())


def _rows(
    plan: Plan, connection_id: int, writer: _Writer, loaded: Loaded
) -> Iterator[tuple[str, list[str], list[tuple[Any, ...]]]]:
    """The rows to write, table by table in chunks, parents before children."""
    planted = plan.planted()
    rng = random.Random(plan.seed + 1)
    ts, flag = _Clock(writer.sqlite), writer.flag
    now, start = _seconds(plan.now), _seconds(plan.period_from)
    span = now - 7200 - start  # every ordinary sale is past the grace period
    ledger: list[tuple[Any, ...]] = []
    orders: list[tuple[Any, ...]] = []
    items: list[tuple[Any, ...]] = []
    wallets: list[tuple[Any, ...]] = []
    next_order = next_item = next_wallet = 1
    expected = loaded.expected
    no, yes = flag(False), flag(True)

    def add_order(
        key: int,
        reference: str,
        partner: str,
        *,
        status: str,
        received: int | None,
        changed: int,
        quantity: int,
        currency: str,
        unit_incl: int,
        unit_excl: int,
        externals: list[str],
        removed: int | None = None,
        message: str | None = None,
    ) -> None:
        nonlocal next_order, next_item, next_wallet
        order_row = next_order
        next_order += 1
        changed_at = ts(changed)
        orders.append(
            (
                order_row,
                connection_id,
                f"00000000-0000-4000-8000-{key:012x}",
                partner,
                reference,
                reference.upper(),
                f"VB{key:010d}",
                status,
                message,
                changed_at,
                ts(received),
                f"pay-{key}",
                key,
                # What VenueOrder.summarize_items keeps for the one item written below.
                quantity,
                unit_incl * len(externals),
                unit_excl * len(externals),
                currency,
                reference_set_key(externals),
                ts(removed),
                changed_at if received is None else ts(received),
                changed_at,
                changed_at,
            )
        )
        items.append((next_item, order_row, 1, "ADULT-DAY", no, quantity))
        for seq, external in enumerate(externals, start=1):
            wallets.append(
                (
                    next_wallet,
                    next_item,
                    seq,
                    f"10000000-0000-4000-8000-{next_wallet:012x}",
                    f"W{next_wallet:012d}",
                    external,
                    unit_excl,
                    unit_incl,
                    currency,
                )
            )
            next_wallet += 1
        next_item += 1

    def flush() -> Iterator[tuple[str, list[str], list[tuple[Any, ...]]]]:
        yield "ledger_line", LEDGER_COLUMNS, ledger.copy()
        yield "venue_order", ORDER_COLUMNS, orders.copy()
        yield "order_item", ITEM_COLUMNS, items.copy()
        yield "wallet", WALLET_COLUMNS, wallets.copy()
        ledger.clear()
        orders.clear()
        items.clear()
        wallets.clear()

    for i in range(plan.lines):
        category = planted.get(i, Category.MATCHED)
        expected[category] += 1
        partner = PARTNERS[i & 1]
        sold = start + span * i // plan.lines
        received: int | None = sold + 5
        changed = sold + 60
        admissions = rng.randint(1, 3)
        currency = CURRENCIES[rng.randrange(3)]
        cents = rng.randint(500, 9_999)
        unit_incl = cents * MICROS_PER_CENT
        unit_excl = (cents * 100 + 60) // 121 * MICROS_PER_CENT  # 21 % VAT, to the cent
        includes_vat = rng.random() >= 0.1
        externals = [f"X{i:08d}-{seq}" for seq in range(1, admissions + 1)]
        amount = (unit_incl if includes_vat else unit_excl) * admissions
        quantity = admissions
        ledger_state = "active"
        ledger_currency = currency
        venue_reference: str | None = f"VB{i:010d}"
        recorded_externals: list[str] | None = externals[::-1]
        status = "Issued"
        message: str | None = None
        removed: int | None = None
        with_order = True
        duplicate = False

        if category is Category.MATCHED:
            decoy = rng.random()
            if decoy < 0.02:
                ledger_state, status = rng.choice(("cancelled", "refunded")), "Cancelled"
            elif decoy < 0.04:
                amount += 4_000  # 0.004: within the tolerance of 0.01
            elif decoy < 0.14:
                venue_reference = f"vb{i:010d}"  # recorded in lower case
            elif decoy < 0.24:
                venue_reference = None
            elif decoy < 0.44:
                recorded_externals = None
            elif decoy < 0.49:
                received = None
        elif category is Category.MISSING_AT_VENUE:
            if i % 2:
                with_order = False
            else:  # deleted at the venue while Draft: the row stays, marked removed
                status, removed = "Draft", changed + 3600
        elif category is Category.MULTIPLE_ORDERS:
            duplicate = True
        elif category is Category.IN_FLIGHT:
            sold = now - 1800
            received = sold + 5
            changed = now - 1200
            status = rng.choice(IN_FLIGHT)
        elif category is Category.STUCK_IN_FLIGHT:
            status = rng.choice(IN_FLIGHT)
        elif category is Category.VENUE_ERROR:
            status, message = "Error", "Item sold out"
        elif category is Category.CANCELLED_IN_LEDGER:
            ledger_state = rng.choice(("cancelled", "refunded"))
            status = "Draft" if i % 4 == 0 else "Issued"
        elif category is Category.CANCELLED_AT_VENUE:
            status = "Cancelled"
        elif category is Category.DRAFT_UNCONFIRMED:
            status = "Draft"
        elif category is Category.REFERENCE_MISMATCH:
            venue_reference = f"VB{i + plan.lines:010d}"
        elif category is Category.QUANTITY_MISMATCH:
            quantity = admissions + 1
        elif category is Category.CURRENCY_MISMATCH:
            ledger_currency = CURRENCIES[(CURRENCIES.index(currency) + 1) % len(CURRENCIES)]
        elif category is Category.AMOUNT_MISMATCH:
            amount += 1_500_000 if i % 2 else -500_000
        elif category is Category.EXTERNAL_REFERENCE_MISMATCH:
            recorded_externals = [*externals[:-1], f"Y{i:08d}"]

        sold_at = ts(sold)
        ledger.append(
            (
                i + 1,
                connection_id,
                partner,
                f"shop-{i:08d}",
                f"SHOP-{i:08d}",
                sold_at,
                quantity,
                amount,
                ledger_currency,
                yes if includes_vat else no,
                f"pay-{i}",
                venue_reference,
                None if recorded_externals is None else json.dumps(recorded_externals),
                reference_set_key(recorded_externals or ()),
                ledger_state,
                "import",
                sold_at,
                sold_at,
            )
        )
        if with_order:
            add_order(
                i,
                f"SHOP-{i:08d}",
                partner,
                status=status,
                received=received,
                changed=changed,
                quantity=admissions,
                currency=currency,
                unit_incl=unit_incl,
                unit_excl=unit_excl,
                externals=externals,
                removed=removed,
                message=message,
            )
        if duplicate:  # an Error replaced by a new order, and the old one issued after all
            add_order(
                i + 2 * plan.lines,
                f"SHOP-{i:08d}",
                partner,
                status="Issued",
                received=changed,
                changed=changed + 60,
                quantity=admissions,
                currency=currency,
                unit_incl=unit_incl,
                unit_excl=unit_excl,
                externals=[f"Z{i:08d}-{seq}" for seq in range(1, admissions + 1)],
            )
        if len(ledger) >= CHUNK:
            yield from flush()

    orphans: list[tuple[int, int]] = []
    for j in range(plan.per_category):  # in the period, unknown to the ledger
        orphans.append((3 * plan.lines + j, start + span * j // plan.per_category))
        expected[Category.ORPHAN] += 1
    for j in range(OUTSIDE):  # before the period, unknown to the ledger: not this run's
        orphans.append((4 * plan.lines + j, start - 3600 * (j + 1)))
    for key, received_at in orphans:
        add_order(
            key,
            f"UNKNOWN-{key:010d}",
            PARTNERS[key & 1],
            status="Issued",
            received=received_at,
            changed=received_at + 60,
            quantity=1,
            currency="EUR",
            unit_incl=2_500 * MICROS_PER_CENT,
            unit_excl=2_066 * MICROS_PER_CENT,
            externals=[f"O{key:010d}"],
        )
    for j in range(OUTSIDE):  # sold before the period, never ordered: not this run's
        line = plan.lines + j
        sold_at = ts(start - 3600 * (j + 1))
        ledger.append(
            (
                line + 1,
                connection_id,
                PARTNERS[0],
                f"shop-{line:08d}",
                f"SHOP-{line:08d}",
                sold_at,
                1,
                2_500 * MICROS_PER_CENT,
                "EUR",
                yes,
                f"pay-{line}",
                None,
                None,
                None,
                "active",
                "import",
                sold_at,
                sold_at,
            )
        )
    yield from flush()


HISTORY_DAYS = 365
"""History is spread over the year before the period."""


def add_history(engine: sa.Engine, plan: Plan, connection_id: int, start: int, count: int) -> None:
    """Add ``count`` matched sales and their orders before the period: history a run skips.

    Each is a sale of the year before ``plan.period_from`` with its Issued venue order
    (the totals it keeps, no items or wallets: a run reads the order's own row only),
    numbered from ``start`` so that calls for growing sizes add to what is there.
    Written as :func:`load` writes, then settled (``VACUUM ANALYZE`` on PostgreSQL).
    """
    ts = _Clock(engine.dialect.name == "sqlite")
    first = _seconds(plan.period_from) - HISTORY_DAYS * 86_400
    span = HISTORY_DAYS * 86_400 - 86_400
    with engine.connect() as connection:
        highest = "SELECT (SELECT max(id) FROM ledger_line), (SELECT max(id) FROM venue_order)"
        next_line, next_order = (
            int(value or 0) for value in connection.exec_driver_sql(highest).one()
        )
    raw = engine.raw_connection()
    try:
        writer = _Writer(engine.dialect.name, raw.driver_connection)
        yes = writer.flag(True)
        if writer.sqlite:
            writer.driver.execute("BEGIN")
        for chunk in range(start, start + count, CHUNK):
            ledger: list[tuple[Any, ...]] = []
            orders: list[tuple[Any, ...]] = []
            for j in range(chunk, min(chunk + CHUNK, start + count)):
                next_line += 1
                next_order += 1
                sold = first + span * (j % 1_000_003) // 1_000_003
                sold_at, received_at = ts(sold), ts(sold + 5)
                reference = f"HIST-{j:09d}"
                ledger.append(
                    (next_line, connection_id, PARTNERS[j & 1], reference.lower(), reference,
                     sold_at, 1, 2_500 * MICROS_PER_CENT, "EUR", yes, f"pay-h{j}", None, None,
                     None, "active", "import", sold_at, sold_at)
                )  # fmt: skip
                orders.append(
                    (next_order, connection_id, f"20000000-0000-4000-8000-{j:012x}",
                     PARTNERS[j & 1], reference, reference, f"VH{j:010d}", "Issued", None,
                     received_at, received_at, f"pay-h{j}", 10_000_000_000 + j, 1,
                     2_500 * MICROS_PER_CENT, 2_066 * MICROS_PER_CENT, "EUR", None, None,
                     received_at, received_at, received_at)
                )  # fmt: skip
            writer.write("ledger_line", LEDGER_COLUMNS, ledger)
            writer.write("venue_order", ORDER_COLUMNS, orders)
        if writer.sqlite:
            writer.driver.execute("COMMIT")
            writer.driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            raw.commit()
    finally:
        raw.close()
    _settle(engine)
