"""The reconciliation engine: one run compares a connection's ledger with its order mirror.

A run (:func:`reconcile`) covers one venue connection and a period ``[from, to)``. All
of the comparison is set-based SQL, the same on SQLite and PostgreSQL (a few dialect
spellings aside): one finding per sale and per orphan goes into a temporary table with
``INSERT … SELECT``, the run's totals are a ``GROUP BY`` over it, and the exceptions are
merged from it with ``INSERT … SELECT`` and ``UPDATE … FROM``. No Python loop ever walks
the rows.

**Scope.** Ledger lines of the connection with ``sold_at`` in the period; venue orders
that are live (not removed) with ``received_at`` (``first_seen_at`` when the venue gave
none) in the period, for orphans. A ledger line matches the live orders of the same
connection with the same ``(partner_id, reference_key)``, wherever their ``received_at``
lies; ``reference_key`` is the normalized (trimmed, upper-cased) reference on both sides,
so references compare case-insensitively by construction. What an order holds (its
items' quantity, its wallets' prices, currencies and external reference numbers) is read
from the totals the order keeps (:meth:`~storage.models.VenueOrder.summarize_items`), so
a run reads one row per sale and per order, never an item or a wallet.

**One category per ledger line**, the first that applies:

1. ``missing_at_venue``: no live order under its reference;
2. ``multiple_orders``: more than one (e.g. an Error replaced by a duplicate);
3. ``in_flight`` / ``stuck_in_flight``: the order is Submitted, Scheduled or Processing.
   It is in flight while the sale *or* the order's last status change is within the
   grace period (``>= now - grace``), stuck otherwise. The later of the two clocks
   counts: a sale replaced long after it was sold, or an order that just moved from
   Submitted to Processing, is progressing; an order with no sale and no change within
   the grace is stuck;
4. ``venue_error``: the order is in Error;
5. ``cancelled_in_ledger``: cancelled or refunded in the ledger, Issued or Draft at the
   venue;
6. ``cancelled_at_venue``: active in the ledger, Cancelled at the venue;
7. ``matched``: cancelled or refunded in the ledger and Cancelled at the venue (no
   content checks: nothing is owed either way);
8. ``draft_unconfirmed``: active in the ledger, Draft at the venue. With or without a
   payment reference: a sale in the ledger is sold, and a Draft issues no tickets, so
   finance must see it either way (``details`` does not hide which);
9. ``reference_mismatch``: the ledger recorded a ``venue_reference`` and it is not the
   order's ``buyFromOrderReference`` (case-insensitive);
10. ``quantity_mismatch``: the ledger quantity is not the sum of the order's item
    quantities;
11. ``currency_mismatch``: a wallet's currency is not the ledger's (skipped when no
    wallet has a currency);
12. ``amount_mismatch``: ``|ledger amount - what the orders come to|`` exceeds the
    tolerance, with prices including VAT when the ledger amount does and excluding it
    otherwise (skipped when no wallet has a price on that basis). The orders come to
    what their wallets carry, added up: a group ticket's one wallet carries the whole
    group's price (:func:`~storage.totals.order_totals`);
13. ``external_reference_mismatch``: the ledger lists external reference numbers (a
    non-empty list) and their set is not the set of the wallets' (trimmed,
    case-insensitive: both sides are kept as :func:`~venue.values.reference_set_key`);
14. ``matched``.

**Orphans**: live orders in the period with no ledger line of the same key (in any
period) are ``orphan``.

**Totals** per (currency, category): count, ledger amount and venue amount. The
ledger side counts in the ledger's currency; the venue amount of a ledger line is the
sum over its live orders on the ledger's VAT basis (0 when none is priced). Orphans
count in their wallets' currency ("XXX" when unknown or mixed), with ledger amount 0
and venue amount the prices including VAT.

**Exceptions** (every category but ``matched`` and ``in_flight``) persist across runs,
identified by ``(connection, category, subject_key)`` with subject_key
``ledger:<partner_id>:<reference_key>`` or ``order:<order_id>`` (orphans). Found again:
``seen`` (amounts and details refreshed; resolved and accepted ones keep finance's
state), or ``reopened`` when it had been closed. New: ``open`` with an ``opened`` event.
Not found again although its subject (``subject_at``) lies in the run's period and it
is open, resolved or accepted: ``closed`` by this run, with a ``closed`` event. So
re-running a period yields the same totals, no new exceptions and no ``opened`` events.

**Lifecycle.** The run row is committed first (``running``). Runs of one connection take
turns (PostgreSQL: an advisory lock on the connection's key; SQLite: a lock file beside
the database), a lock that blocks nothing but another run of the connection: never the
receiver, the worker or an import storing the connection's orders and ledger lines, as
a lock on the connection's row did. PostgreSQL then finds and records in one
transaction, which also finishes the run. SQLite finds in a read transaction (into
TEMP tables, which take no lock on the database's file) and records in one short write
transaction that also finishes the run: SQLite's single write lock is held only while
a few rows per exception are written. Either way readers see a run ``running`` with no
results, or finished with all of them. On a failure the work is rolled back and the run
is recorded ``failed`` with the error, then :class:`ReconRunFailed` is raised.
"""

# The SQL below is assembled from this module's constants (table names, category values,
# dialect spellings), never from data: every value goes through a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.categories import Category
from reconciler.turns import take_turn_postgresql, take_turn_sqlite
from storage.engine import SQLITE_BEGIN_OPTION
from storage.records import ReconRun, ReconRunState, ReconTrigger
from storage.types import UTCDateTime, to_micros

logger = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 500
"""How much of a failure's message the run row keeps."""

POSTGRESQL_WORK_MEM = "128MB"
"""``work_mem`` of a run's transaction on PostgreSQL: enough to hash a million rows."""

UNKNOWN_CURRENCY = "XXX"
"""ISO 4217's "no currency": an orphan whose wallets name none, or several."""

_FINDINGS = "recon_finding"
_EXCEPTION_FINDINGS = "recon_exception_finding"
_TOTALS = "recon_found_total"
_EXCEPTION_CATEGORIES = tuple(sorted(c.value for c in Category if c.is_exception))


class ReconRunFailed(RuntimeError):
    """A run failed; its work was rolled back and its row records the error.

    Attributes:
        run_id: the failed run's id.
    """

    def __init__(self, run_id: int, error: str) -> None:
        super().__init__(f"reconciliation run {run_id} failed: {error}")
        self.run_id = run_id


def reconcile(
    sessions: sessionmaker[Session],
    *,
    connection_id: int,
    period_from: dt.datetime,
    period_to: dt.datetime,
    now: dt.datetime,
    trigger: ReconTrigger,
    actor: str | None,
    grace: dt.timedelta,
    tolerance: Decimal,
    partner_ids: Collection[str] | None = None,
) -> int:
    """Run one reconciliation of ``connection_id`` over ``[period_from, period_to)``.

    Args:
        sessions: the session factory; the run owns its transactions.
        connection_id: the venue connection's row id.
        period_from: start of the period (aware, inclusive).
        period_to: end of the period (aware, exclusive).
        now: the run's time: its start, and the clock of the grace period.
        trigger: manual or scheduled.
        actor: who started a manual run (``None`` for scheduled runs).
        grace: how long an order may stay in flight before it is stuck.
        tolerance: the largest amount difference that still matches.
        partner_ids: the partners configured for the connection: only their sales and
            orders are compared (the venue's webhooks and getOrder are company-wide, so
            other partners' orders may have reached the mirror). ``None`` compares every
            partner's.

    Returns:
        The run's id.

    Raises:
        ValueError: the period is empty or a time is naive (no run is recorded).
        ReconRunFailed: the comparison failed; the run is recorded ``failed``.
    """
    for name, value in (("period_from", period_from), ("period_to", period_to), ("now", now)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{name} must be an aware datetime, not {value.isoformat()}")
    if period_from >= period_to:
        raise ValueError(
            f"empty period: {period_from.isoformat()} is not before {period_to.isoformat()}"
        )
    started = time.monotonic()
    with sessions.begin() as session:
        run = ReconRun(
            connection_id=connection_id,
            started_at=now,
            period_from=period_from,
            period_to=period_to,
            trigger=trigger,
            state=ReconRunState.RUNNING,
            actor=actor,
        )
        session.add(run)
        session.flush()
        run_id = run.id
    logger.info(
        "reconciliation run %s: connection %s, %s to %s",
        run_id,
        connection_id,
        period_from.isoformat(),
        period_to.isoformat(),
    )
    params = {
        "connection_id": connection_id,
        "run_id": run_id,
        "period_from": period_from,
        "period_to": period_to,
        "now": now,
        "cutoff": now - grace,
        "tolerance": to_micros(tolerance),
        "actor": actor,
        "partner_ids": None if partner_ids is None else sorted(partner_ids),
    }
    finish = (
        sa.update(ReconRun)
        .where(ReconRun.id == run_id)
        .values(state=ReconRunState.FINISHED, finished_at=sa.bindparam("finished_at"))
    )
    engine: sa.Engine = sessions.kw["bind"]
    try:
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                take_turn_postgresql(connection, connection_id, run_id)
                _find(connection, params, postgresql=True)
                _record(connection, params, postgresql=True)
                connection.execute(finish, {"finished_at": _finished(now, started)})
        else:
            with take_turn_sqlite(engine, connection_id, run_id), engine.connect() as connection:
                # The findings are computed in a read transaction into TEMP tables, which
                # live in the connection's own temporary database: no write lock on the
                # database's file. Only the writes (totals, exceptions, the run's end: a
                # few rows per exception) take it, in one short transaction, so readers
                # see the run finished with all of its results, or running with none.
                connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
                try:
                    with connection.begin():
                        _find(connection, params, postgresql=False)
                    # The long read kept the WAL from being checkpointed; catch up here
                    # (PASSIVE: writers go on), not in the next webhook's commit.
                    driver = connection.connection.driver_connection
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
                    connection.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
                    with connection.begin():
                        _record(connection, params, postgresql=False)
                        connection.execute(finish, {"finished_at": _finished(now, started)})
                finally:
                    # The pooled connection keeps its TEMP tables until they are dropped.
                    connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
                    with connection.begin():
                        for table in _TABLES:
                            connection.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{table}")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".strip()[:MAX_ERROR_LENGTH]
        logger.exception("reconciliation run %s failed", run_id)
        with sessions.begin() as session:
            session.execute(
                sa.update(ReconRun)
                .where(ReconRun.id == run_id)
                .values(
                    state=ReconRunState.FAILED, finished_at=_finished(now, started), error=error
                )
            )
        raise ReconRunFailed(run_id, error) from exc
    logger.info("reconciliation run %s finished", run_id)
    return run_id


def _finished(now: dt.datetime, started: float) -> dt.datetime:
    # On the run's own clock: ``now`` plus the time the run took.
    return now + dt.timedelta(seconds=time.monotonic() - started)


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
_TABLES = {
    _FINDINGS: _FINDING_TABLE,
    _EXCEPTION_FINDINGS: f"""{_FINDING_TABLE},
    subject_key VARCHAR(200) NOT NULL,
    shop_reference VARCHAR(100),
    order_guid VARCHAR(64),
    status VARCHAR(16),
    ledger_state VARCHAR(16),
    ledger_quantity INTEGER,
    venue_reference VARCHAR(50),
    buy_from_order_reference VARCHAR(50)""",
    _TOTALS: """
    currency VARCHAR(10) NOT NULL,
    category VARCHAR(32) NOT NULL,
    count BIGINT NOT NULL,
    ledger_amount BIGINT NOT NULL,
    venue_amount BIGINT NOT NULL""",
}
"""The temporary tables of a run, by name: their columns (``{timestamp}``: the dialect's)."""


def _find(connection: sa.Connection, params: dict[str, Any], *, postgresql: bool) -> None:
    """Find every sale's and orphan's category into temporary tables: reads only the data.

    Two ``INSERT … SELECT`` statements write one finding per sale of the period and per
    orphan into a temporary table; each order's totals are columns of its row (kept by
    :meth:`~storage.models.VenueOrder.summarize_items`), so a sale needs no item or
    wallet. Only the exceptions, a small share, then get the wide rows their details need.
    """
    timestamp = "TIMESTAMP WITH TIME ZONE" if postgresql else "TEXT"
    if postgresql:
        # The sales' join and grouping are hashed; PostgreSQL's default 4 MB spills a
        # million rows to disk many times over. JIT compiles each statement anew and
        # costs more than it saves here. For this transaction only.
        _execute(connection, f"SET LOCAL work_mem = '{POSTGRESQL_WORK_MEM}'", params)
        _execute(connection, "SET LOCAL jit = off", params)
    for table, columns in _TABLES.items():
        columns = columns.replace("{timestamp}", timestamp)
        if postgresql:
            _execute(
                connection, f"CREATE TEMPORARY TABLE {table} ({columns}) ON COMMIT DROP", params
            )
        else:
            _execute(connection, f"DROP TABLE IF EXISTS temp.{table}", params)
            _execute(connection, f"CREATE TEMPORARY TABLE {table} ({columns})", params)

    for table, sql in (
        (_FINDINGS, _LEDGER_FINDINGS_SQL),
        (_FINDINGS, _ORPHAN_FINDINGS_SQL),
        (_EXCEPTION_FINDINGS, _EXCEPTION_FINDINGS_SQL),
    ):
        _execute(connection, sql, params)
        if postgresql:
            # Temporary tables are never auto-analyzed; the next steps need estimates.
            _execute(connection, f"ANALYZE {table}", params)
    _execute(
        connection,
        f"CREATE INDEX recon_exception_finding_subject ON {_EXCEPTION_FINDINGS} (subject_key)",
        params,
    )
    _execute(connection, _TOTALS_SQL, params)


def _record(connection: sa.Connection, params: dict[str, Any], *, postgresql: bool) -> None:
    """Write the run's totals and merge its exceptions, from what :func:`_find` found."""
    _execute(connection, _RECORD_TOTALS_SQL, params)
    _merge_exceptions(connection, params, postgresql)


def _execute(connection: sa.Connection, sql: str, params: dict[str, Any]) -> None:
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
_ACTIVE = "'open', 'resolved', 'accepted'"
_IN_PERIOD = (
    "l.connection_id = :connection_id AND l.sold_at >= :period_from AND l.sold_at < :period_to"
)
_FINDING_COLUMNS = (
    "line_id, order_pk, order_count, category, subject_at, currency, ledger_amount, "
    "venue_amount, venue_quantity, venue_currency"
)
_C = Category

# Each sale of the period with its live orders (grouped by the sale's primary key, on
# which every other column of the sale depends). With one order, MIN() is that order's
# value; with several the category is multiple_orders and no order's value decides.
_LEDGER_FINDINGS_SQL = f"""
    INSERT INTO {_FINDINGS} ({_FINDING_COLUMNS})
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
            WHEN venue_amount IS NOT NULL AND ABS(amount - venue_amount) > :tolerance
                THEN '{_C.AMOUNT_MISMATCH}'
            WHEN listed_references IS NOT NULL AND (
                wallet_references IS NULL OR wallet_references <> listed_references
            ) THEN '{_C.EXTERNAL_REFERENCE_MISMATCH}'
            ELSE '{_C.MATCHED}'
        END,
        sold_at, currency, amount, venue_amount, venue_quantity,
        CASE WHEN currency_min = currency_max THEN currency_min
             ELSE currency_min || '/' || currency_max END
    FROM (
        SELECT l.id, l.sold_at, l.quantity, l.amount, l.currency, l.state,
               NULLIF(TRIM(l.venue_reference), '') AS recorded_reference,
               l.external_references_key AS listed_references,
               COUNT(o.id) AS order_count, MIN(o.id) AS order_pk,
               SUM(o.items_quantity) AS venue_quantity,
               CASE WHEN l.amount_includes_vat THEN SUM(o.amount_incl_vat)
                    ELSE SUM(o.amount_excl_vat) END AS venue_amount,
               MIN(o.wallet_currencies) AS currency_min,
               MAX(o.wallet_currencies) AS currency_max,
               MIN(o.status) AS status, MIN(o.status_changed_at) AS status_changed_at,
               MIN(o.buy_from_order_reference) AS buy_from_order_reference,
               MIN(o.wallet_external_references) AS wallet_references
        FROM ledger_line l
        LEFT JOIN venue_order o
          ON o.connection_id = l.connection_id AND o.partner_id = l.partner_id
         AND o.reference_key = l.reference_key AND o.removed_at IS NULL
        WHERE {_IN_PERIOD} {_partner_scope("l")}
        GROUP BY l.id
    ) compared
"""

# Live orders of the period that no sale has, in any period. An order's time is
# received_at, or first_seen_at when the venue gave none; spelled out as two ranges
# rather than COALESCE(...) so the planner estimates them from the columns' statistics
# (with COALESCE it guesses a few thousand rows, and probes the ledger's index once per
# order instead of hashing it once).
_ORPHAN_FINDINGS_SQL = f"""
    INSERT INTO {_FINDINGS} ({_FINDING_COLUMNS})
    SELECT NULL, o.id, 1, '{Category.ORPHAN}', COALESCE(o.received_at, o.first_seen_at),
           CASE WHEN o.wallet_currencies NOT LIKE '%/%' THEN o.wallet_currencies
                ELSE '{UNKNOWN_CURRENCY}' END,
           NULL, o.amount_incl_vat, o.items_quantity, o.wallet_currencies
    FROM venue_order o
    WHERE o.connection_id = :connection_id AND o.removed_at IS NULL {_partner_scope("o")}
      AND (
          (o.received_at >= :period_from AND o.received_at < :period_to)
          OR (o.received_at IS NULL
              AND o.first_seen_at >= :period_from AND o.first_seen_at < :period_to)
      )
      AND NOT EXISTS (
          SELECT 1 FROM ledger_line l
          WHERE l.connection_id = o.connection_id AND l.partner_id = o.partner_id
            AND l.reference_key = o.reference_key
      )
"""

# The exceptions among the findings, with what their details show: a few thousand rows
# at most, where the findings are one per sale.
_EXCEPTION_FINDINGS_SQL = f"""
    INSERT INTO {_EXCEPTION_FINDINGS} (
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
    FROM {_FINDINGS} f
    LEFT JOIN ledger_line l ON l.id = f.line_id
    LEFT JOIN venue_order o ON o.id = f.order_pk
    WHERE f.category IN ({", ".join(f"'{c}'" for c in _EXCEPTION_CATEGORIES)})
"""

# Added up while finding (a GROUP BY over every finding); recording copies a few rows.
_TOTALS_SQL = f"""
    INSERT INTO {_TOTALS} (currency, category, count, ledger_amount, venue_amount)
    SELECT currency, category, COUNT(*),
           COALESCE(SUM(ledger_amount), 0), COALESCE(SUM(venue_amount), 0)
    FROM {_FINDINGS}
    GROUP BY currency, category
"""
_RECORD_TOTALS_SQL = f"""
    INSERT INTO recon_total (
        recon_run_id, currency, category, count, ledger_amount, venue_amount
    )
    SELECT :run_id, currency, category, count, ledger_amount, venue_amount
    FROM {_TOTALS}
"""


def _merge_exceptions(connection: sa.Connection, params: dict[str, Any], postgresql: bool) -> None:
    """Open, see, reopen and close the connection's exceptions from the exception findings."""
    json_object = "json_build_object" if postgresql else "json_object"
    details = f"""{json_object}(
        'shop_reference', f.shop_reference, 'order_id', f.order_guid,
        'order_count', f.order_count, 'status', f.status, 'ledger_state', f.ledger_state,
        'quantity', f.ledger_quantity, 'venue_quantity', f.venue_quantity,
        'venue_currency', f.venue_currency, 'venue_reference', f.venue_reference,
        'buy_from_order_reference', f.buy_from_order_reference)"""
    same = (
        "e.connection_id = :connection_id AND e.category = f.category "
        "AND e.subject_key = f.subject_key"
    )
    # Known exceptions found again: the event first, while the old state is still there.
    _execute(
        connection,
        f"""
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT e.id, :run_id,
               CASE WHEN e.state = 'closed' THEN 'reopened' ELSE 'seen' END,
               :actor, NULL, :now
        FROM {_EXCEPTION_FINDINGS} f JOIN recon_exception e ON {same}
        """,
        params,
    )
    _execute(
        connection,
        f"""
        UPDATE recon_exception
        SET state = CASE WHEN state = 'closed' THEN 'open' ELSE state END,
            closed_run_id = NULL,
            last_seen_run_id = :run_id,
            ledger_line_id = f.line_id,
            venue_order_id = f.order_pk,
            currency = f.currency,
            ledger_amount = f.ledger_amount,
            venue_amount = f.venue_amount,
            details = {details},
            subject_at = f.subject_at,
            updated_at = :now
        FROM {_EXCEPTION_FINDINGS} f
        WHERE recon_exception.connection_id = :connection_id
          AND recon_exception.category = f.category
          AND recon_exception.subject_key = f.subject_key
        """,
        params,
    )
    _execute(
        connection,
        f"""
        INSERT INTO recon_exception (
            connection_id, category, subject_key, ledger_line_id, venue_order_id, currency,
            ledger_amount, venue_amount, details, subject_at, state, first_seen_run_id,
            last_seen_run_id, closed_run_id, first_seen_at, updated_at
        )
        SELECT :connection_id, f.category, f.subject_key, f.line_id, f.order_pk, f.currency,
               f.ledger_amount, f.venue_amount, {details}, f.subject_at, 'open', :run_id,
               :run_id, NULL, :now, :now
        FROM {_EXCEPTION_FINDINGS} f
        WHERE NOT EXISTS (SELECT 1 FROM recon_exception e WHERE {same})
        """,
        params,
    )
    _execute(
        connection,
        """
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT e.id, :run_id, 'opened', :actor, NULL, :now
        FROM recon_exception e
        WHERE e.connection_id = :connection_id AND e.first_seen_run_id = :run_id
        """,
        params,
    )
    stale = f"""
        connection_id = :connection_id AND state IN ({_ACTIVE})
        AND subject_at >= :period_from AND subject_at < :period_to
        AND last_seen_run_id <> :run_id
    """
    _execute(
        connection,
        f"""
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT id, :run_id, 'closed', :actor, NULL, :now
        FROM recon_exception WHERE {stale}
        """,
        params,
    )
    _execute(
        connection,
        f"""
        UPDATE recon_exception
        SET state = 'closed', closed_run_id = :run_id, updated_at = :now
        WHERE {stale}
        """,
        params,
    )


@dataclass(frozen=True)
class ReconcileReport:
    """What :func:`reconcile_connections` did: a run per connection, and those that failed.

    Attributes:
        runs: the run id of each connection, by connection row id, the failed runs
            included.
        failures: why each failed run failed, by connection row id.
    """

    runs: dict[int, int] = field(default_factory=dict)
    failures: dict[int, ReconRunFailed] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        """The connections whose run failed, in the order they ran."""
        return list(self.failures)

    def raise_first_failure(self) -> None:
        """Raise the first failed run's :class:`ReconRunFailed`, if a run failed.

        Raises:
            ReconRunFailed: a connection's run failed (the others finished).
        """
        for failure in self.failures.values():
            raise failure

    def as_dict(self) -> dict[str, Any]:
        """For logs and ``--json``."""
        return {"runs": len(self.runs), "failed": len(self.failures)}


def reconcile_connections(
    sessions: sessionmaker[Session],
    connection_ids: Iterable[int],
    *,
    period_from: dt.datetime,
    period_to: dt.datetime,
    now: dt.datetime,
    trigger: ReconTrigger,
    actor: str | None,
    grace: dt.timedelta,
    tolerance: Decimal,
    partners: Mapping[int, Collection[str]] | None = None,
) -> ReconcileReport:
    """Reconcile each connection over one period: the scheduled job and ``otacm reconcile``.

    A failing connection does not stop the others: its run is in the report with the
    others, and its failure beside it (:meth:`ReconcileReport.raise_first_failure` raises
    it, for a caller whose own record must show it, as the scheduled job's).
    ``partners`` gives each connection's configured partners, to which its run is
    restricted (:func:`reconcile`).

    Returns:
        The run of each connection, and the failures among them.
    """
    report = ReconcileReport()
    for connection_id in connection_ids:
        try:
            report.runs[connection_id] = reconcile(
                sessions,
                connection_id=connection_id,
                period_from=period_from,
                period_to=period_to,
                now=now,
                trigger=trigger,
                actor=actor,
                grace=grace,
                tolerance=tolerance,
                partner_ids=None if partners is None else partners.get(connection_id, ()),
            )
        except ReconRunFailed as failure:
            report.runs[connection_id] = failure.run_id
            report.failures[connection_id] = failure
    return report
