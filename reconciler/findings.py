"""What a reconciliation run finds: the SQL that compares one period's sales and orders.

:func:`find` writes one finding per sale of the period and per orphan into temporary
tables (``INSERT … SELECT``, no row loop), then the exceptions among them with what their
details show, and the totals per currency and category; :mod:`reconciler.engine` runs it
and records the results (its docstring states every rule). Everything here reads; nothing
writes a table of the database.

**Only the period is read.** A run's cost follows its period, not the history before it:
the sales come from the ledger's ``(connection_id, sold_at)`` index; each sale's live
orders are found through the mirror's ``(connection_id, partner_id, reference_key)``
index, one sale at a time, wherever their ``received_at`` lies (on PostgreSQL a
``LATERAL`` subquery says so, as long as the period's sales are few against the orders
mirrored, :func:`_few_sales`: a join let its planner hash every order ever mirrored);
the orphans come from the mirror's indexes by time, ``(connection_id, received_at)`` and,
for orders the venue gave no ``receivedAt``, ``(connection_id, first_seen_at)`` of those
alone; whether a sale has an orphan's reference is asked of the ledger's unique index,
one order at a time. Outside the period, a run reads only the orders its sales match
(a sale's order received before or after the period) and the ledger lines its orphans'
references name (a sale of an earlier period).
"""

# The SQL below is assembled from this module's constants (table names, category values,
# dialect spellings), never from data: every value goes through a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import logging
import re
import time
from typing import Any

import sqlalchemy as sa

from reconciler.categories import Category
from storage.types import UTCDateTime

logger = logging.getLogger(__name__)

POSTGRESQL_WORK_MEM = "128MB"
"""``work_mem`` of a run's transaction on PostgreSQL: enough to hash a million rows."""

UNKNOWN_CURRENCY = "XXX"
"""ISO 4217's "no currency": an orphan whose wallets name none, or several."""

FINDINGS = "recon_finding"
EXCEPTION_FINDINGS = "recon_exception_finding"
TOTALS = "recon_found_total"
"""The temporary tables a run finds into."""
_EXCEPTION_CATEGORIES = tuple(sorted(c.value for c in Category if c.is_exception))
_FINDING_TABLE = """
    line_id BIGINT,
    order_pk BIGINT,
    order_count INTEGER NOT NULL,
    category VARCHAR(32) NOT NULL,
    subject_at {timestamp},
    currency VARCHAR(10) NOT NULL,
    ledger_amount BIGINT,
    venue_amount BIGINT,
    venue_quantity BIGINT,
    venue_currency TEXT"""

TABLES = {
    FINDINGS: _FINDING_TABLE,
    EXCEPTION_FINDINGS: f"""{_FINDING_TABLE},
    subject_key VARCHAR(200) NOT NULL,
    shop_reference VARCHAR(100),
    order_guid VARCHAR(64),
    status VARCHAR(16),
    ledger_state VARCHAR(16),
    ledger_quantity INTEGER,
    venue_reference VARCHAR(50),
    buy_from_order_reference VARCHAR(50)""",
    TOTALS: """
    currency VARCHAR(10) NOT NULL,
    category VARCHAR(32) NOT NULL,
    count BIGINT NOT NULL,
    ledger_amount BIGINT NOT NULL,
    venue_amount BIGINT NOT NULL""",
}
"""The temporary tables of a run, by name: their columns (``{timestamp}``: the dialect's)."""


def find(connection: sa.Connection, params: dict[str, Any], *, postgresql: bool) -> None:
    """Find every sale's and orphan's category into temporary tables: reads only the data.

    ``INSERT … SELECT`` statements write one finding per sale of the period and per
    orphan into a temporary table (:func:`finding_statements`); each order's totals are
    columns of its row (kept by :meth:`~storage.models.VenueOrder.summarize_items`), so a
    sale needs no item or wallet. Only the exceptions, a small share, then get the wide
    rows their details need.
    """
    timestamp = "TIMESTAMP WITH TIME ZONE" if postgresql else "TEXT"
    if postgresql:
        # The sales' join and grouping are hashed; PostgreSQL's default 4 MB spills a
        # million rows to disk many times over. JIT compiles each statement anew and
        # costs more than it saves here. For this transaction only.
        execute(connection, f"SET LOCAL work_mem = '{POSTGRESQL_WORK_MEM}'", params)
        execute(connection, "SET LOCAL jit = off", params)
    for table, columns in TABLES.items():
        columns = columns.replace("{timestamp}", timestamp)
        if postgresql:
            execute(
                connection, f"CREATE TEMPORARY TABLE {table} ({columns}) ON COMMIT DROP", params
            )
        else:
            execute(connection, f"DROP TABLE IF EXISTS temp.{table}", params)
            execute(connection, f"CREATE TEMPORARY TABLE {table} ({columns})", params)

    one_by_one = postgresql and _few_sales(connection, params)
    logger.debug("sales' orders %s", "searched per sale" if one_by_one else "joined")
    for table, statements in (
        (FINDINGS, finding_statements(one_by_one)),
        (EXCEPTION_FINDINGS, [_EXCEPTION_FINDINGS_SQL]),
    ):
        for sql in statements:
            execute(connection, sql, params)
        if postgresql:
            # Temporary tables are never auto-analyzed; the next steps need estimates
            # (once a table is filled: an ANALYZE costs about as much as a statement).
            execute(connection, f"ANALYZE {table}", params)
    execute(
        connection,
        f"CREATE INDEX recon_exception_finding_subject ON {EXCEPTION_FINDINGS} (subject_key)",
        params,
    )
    execute(connection, _TOTALS_SQL, params)


def execute(connection: sa.Connection, sql: str, params: dict[str, Any]) -> None:
    sql = _scoped(sql, params.get("partner_ids"))
    statement = sa.text(sql).bindparams(
        *(
            sa.bindparam(name, type_=UTCDateTime())
            for name in ("period_from", "period_to", "now", "cutoff")
            if f":{name}" in sql
        )
    )
    if ":partner_ids" in sql:
        statement = statement.bindparams(sa.bindparam("partner_ids", expanding=True))
    used = {name: value for name, value in params.items() if f":{name}" in sql}
    started = time.monotonic()
    result = connection.execute(statement, used)
    rows = getattr(result, "rowcount", -1)
    logger.debug(
        "%s: %s rows in %.2fs", " ".join(sql.split())[:60], rows, time.monotonic() - started
    )


def _partner_scope(alias: str) -> str:
    """A marker: here the statement restricts ``alias``'s rows to the configured partners."""
    return f"/* partners of {alias} */"


_PARTNER_SCOPE = re.compile(r"/\* partners of (\w+) \*/")


def _scoped(sql: str, partner_ids: list[str] | None) -> str:
    """``sql`` with its partner scopes: the configured partners' rows only, or every row.

    An empty list matches no partner, and so no row (``IN`` over nothing is spelled
    ``1 = 0``, which every database takes).
    """
    if partner_ids is None:
        return _PARTNER_SCOPE.sub("", sql)
    if not partner_ids:
        return _PARTNER_SCOPE.sub("AND 1 = 0", sql)
    return _PARTNER_SCOPE.sub(lambda m: f"AND {m.group(1)}.partner_id IN :partner_ids", sql)


_IN_FLIGHT = "'Submitted', 'Scheduled', 'Processing'"
_IN_PERIOD = (
    "l.connection_id = :connection_id AND l.sold_at >= :period_from AND l.sold_at < :period_to"
)
_FINDING_COLUMNS = (
    "line_id, order_pk, order_count, category, subject_at, currency, ledger_amount, "
    "venue_amount, venue_quantity, venue_currency"
)
_C = Category

# What a sale's live orders come to (with one order, MIN() is that order's value; with
# several the category is multiple_orders and no order's value decides), and which
# orders those are: the same connection, partner and reference key, at any time.
_ORDERS_OF_SALE = """
    COUNT(o.id) AS order_count, MIN(o.id) AS order_pk,
    SUM(o.items_quantity) AS venue_quantity,
    SUM(o.amount_incl_vat) AS amount_incl_vat, SUM(o.amount_excl_vat) AS amount_excl_vat,
    MIN(o.wallet_currencies) AS currency_min, MAX(o.wallet_currencies) AS currency_max,
    MIN(o.status) AS status, MIN(o.status_changed_at) AS status_changed_at,
    MIN(o.buy_from_order_reference) AS buy_from_order_reference,
    MIN(o.wallet_external_references) AS wallet_references"""
_SAME_SALE = """o.connection_id = l.connection_id AND o.partner_id = l.partner_id
    AND o.reference_key = l.reference_key AND o.removed_at IS NULL"""
_SALE_COLUMNS = """l.id, l.sold_at, l.quantity, l.amount, l.currency, l.state,
    l.amount_includes_vat, NULLIF(TRIM(l.venue_reference), '') AS recorded_reference,
    l.external_references_key AS listed_references"""
_VENUE_AMOUNT = "CASE WHEN amount_includes_vat THEN amount_incl_vat ELSE amount_excl_vat END"

# Each sale of the period with its live orders: one sale at a time, each sale's orders
# in a LATERAL subquery (an index search per sale, PostgreSQL only); or joined and
# grouped by the sale, which PostgreSQL's planner may hash (reading every live order of
# the connection) and SQLite's runs as an index search per sale.
_SALES_ONE_BY_ONE = f"""
    SELECT {_SALE_COLUMNS}, orders.*
    FROM ledger_line l
    CROSS JOIN LATERAL (SELECT {_ORDERS_OF_SALE} FROM venue_order o WHERE {_SAME_SALE}) orders
    WHERE {_IN_PERIOD} {_partner_scope("l")}
"""
_SALES_JOINED = f"""
    SELECT {_SALE_COLUMNS}, {_ORDERS_OF_SALE}
    FROM ledger_line l
    LEFT JOIN venue_order o ON {_SAME_SALE}
    WHERE {_IN_PERIOD} {_partner_scope("l")}
    GROUP BY l.id
"""


def _ledger_findings_sql(one_by_one: bool) -> str:
    """One finding per sale of the period: its category, amounts and orders' totals."""
    sales = _SALES_ONE_BY_ONE if one_by_one else _SALES_JOINED
    return f"""
    INSERT INTO {FINDINGS} ({_FINDING_COLUMNS})
    SELECT
        id, order_pk, order_count,
        CASE
            WHEN order_count = 0 THEN '{_C.MISSING_AT_VENUE}'
            WHEN order_count > 1 THEN '{_C.MULTIPLE_ORDERS}'
            WHEN status IN ({_IN_FLIGHT}) THEN
                CASE WHEN sold_at >= :cutoff OR status_changed_at >= :cutoff
                     THEN '{_C.IN_FLIGHT}' ELSE '{_C.STUCK_IN_FLIGHT}' END
            WHEN status = 'Error' THEN '{_C.VENUE_ERROR}'
            WHEN state <> 'active' AND status IN ('Issued', 'Draft')
                THEN '{_C.CANCELLED_IN_LEDGER}'
            WHEN state = 'active' AND status = 'Cancelled' THEN '{_C.CANCELLED_AT_VENUE}'
            WHEN state <> 'active' THEN '{_C.MATCHED}'
            WHEN status = 'Draft' THEN '{_C.DRAFT_UNCONFIRMED}'
            WHEN recorded_reference IS NOT NULL AND (
                buy_from_order_reference IS NULL
                OR UPPER(recorded_reference) <> UPPER(TRIM(buy_from_order_reference))
            ) THEN '{_C.REFERENCE_MISMATCH}'
            WHEN quantity <> COALESCE(venue_quantity, 0) THEN '{_C.QUANTITY_MISMATCH}'
            WHEN currency_min IS NOT NULL AND (
                currency_min <> UPPER(currency) OR currency_max <> UPPER(currency)
            ) THEN '{_C.CURRENCY_MISMATCH}'
            WHEN {_VENUE_AMOUNT} IS NOT NULL
                AND ABS(amount - {_VENUE_AMOUNT}) > :tolerance
                THEN '{_C.AMOUNT_MISMATCH}'
            WHEN listed_references IS NOT NULL AND (
                wallet_references IS NULL OR wallet_references <> listed_references
            ) THEN '{_C.EXTERNAL_REFERENCE_MISMATCH}'
            ELSE '{_C.MATCHED}'
        END,
        sold_at, currency, amount, {_VENUE_AMOUNT}, venue_quantity,
        CASE WHEN currency_min = currency_max THEN currency_min
             ELSE currency_min || '/' || currency_max END
    FROM ({sales}) compared
"""


# Live orders of the period that no sale has, in any period. An order's time is
# received_at, or first_seen_at when the venue gave none: two statements, one per range,
# each read from its own index by time (a partial one for the orders without
# received_at), so a run reads the period's orders, not the connection's every order.
# Whether a sale has the order's reference is an index search per order, in any period.
_ORPHAN_RANGES = (
    "o.received_at >= :period_from AND o.received_at < :period_to",
    "o.received_at IS NULL AND o.first_seen_at >= :period_from AND o.first_seen_at < :period_to",
)


def _orphan_findings_sql(time_range: str) -> str:
    """One finding per live order of ``time_range`` that no sale has."""
    return f"""
    INSERT INTO {FINDINGS} ({_FINDING_COLUMNS})
    SELECT NULL, o.id, 1, '{Category.ORPHAN}', COALESCE(o.received_at, o.first_seen_at),
           CASE WHEN o.wallet_currencies NOT LIKE '%/%' THEN o.wallet_currencies
                ELSE '{UNKNOWN_CURRENCY}' END,
           NULL, o.amount_incl_vat, o.items_quantity, o.wallet_currencies
    FROM venue_order o
    WHERE o.connection_id = :connection_id AND {time_range}
      AND o.removed_at IS NULL {_partner_scope("o")}
      AND NOT EXISTS (
          SELECT 1 FROM ledger_line l
          WHERE l.connection_id = o.connection_id AND l.partner_id = o.partner_id
            AND l.reference_key = o.reference_key
      )
"""


def finding_statements(one_by_one: bool) -> list[str]:
    """The statements that find into :data:`FINDINGS`: the sales (``one_by_one``: each
    sale's orders in a LATERAL subquery, PostgreSQL only), then the orphans."""
    return [_ledger_findings_sql(one_by_one), *map(_orphan_findings_sql, _ORPHAN_RANGES)]


def _few_sales(connection: sa.Connection, params: dict[str, Any]) -> bool:
    """PostgreSQL: whether the period's sales are at most half as many as the mirror's
    orders (its planner's estimate; unknown counts as many), so that searching each
    sale's orders reads less than hashing every order.

    Measured (``bench/reconcile``, ``bench/reconcile/history.py``): a search per sale
    costs about what two orders hashed do, and a hash join reads every order the
    connection ever had. With few sales against a long history the searches win by the
    history's size; when the period holds most orders (a first run over everything),
    the hash join is twice as fast.
    """
    sales = connection.execute(
        sa.text(f"SELECT count(*) FROM ledger_line l WHERE {_IN_PERIOD}").bindparams(
            sa.bindparam("period_from", type_=UTCDateTime()),
            sa.bindparam("period_to", type_=UTCDateTime()),
        ),
        {name: params[name] for name in ("connection_id", "period_from", "period_to")},
    ).scalar_one()
    orders = connection.exec_driver_sql(
        "SELECT reltuples FROM pg_class WHERE oid = 'venue_order'::regclass"
    ).scalar_one()
    return bool(orders < 0 or 2 * sales <= orders)


# The exceptions among the findings, with what their details show: a few thousand rows
# at most, where the findings are one per sale.
_EXCEPTION_FINDINGS_SQL = f"""
    INSERT INTO {EXCEPTION_FINDINGS} (
        {_FINDING_COLUMNS}, subject_key, shop_reference, order_guid, status, ledger_state,
        ledger_quantity, venue_reference, buy_from_order_reference
    )
    SELECT f.line_id, f.order_pk, f.order_count, f.category, f.subject_at, f.currency,
           f.ledger_amount, f.venue_amount, f.venue_quantity, f.venue_currency,
           CASE WHEN f.line_id IS NULL THEN 'order:' || o.order_id
                ELSE 'ledger:' || l.partner_id || ':' || l.reference_key END,
           COALESCE(l.shop_reference, o.sell_to_order_reference), o.order_id, o.status,
           l.state, l.quantity, NULLIF(TRIM(l.venue_reference), ''),
           o.buy_from_order_reference
    FROM {FINDINGS} f
    LEFT JOIN ledger_line l ON l.id = f.line_id
    LEFT JOIN venue_order o ON o.id = f.order_pk
    WHERE f.category IN ({", ".join(f"'{c}'" for c in _EXCEPTION_CATEGORIES)})
"""

# Added up while finding (a GROUP BY over every finding); recording copies a few rows.
_TOTALS_SQL = f"""
    INSERT INTO {TOTALS} (currency, category, count, ledger_amount, venue_amount)
    SELECT currency, category, COUNT(*),
           COALESCE(SUM(ledger_amount), 0), COALESCE(SUM(venue_amount), 0)
    FROM {FINDINGS}
    GROUP BY currency, category
"""
