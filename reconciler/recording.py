"""How a run records what it found: its totals, and its exceptions opened, seen and closed.

:mod:`reconciler.findings` finds into temporary tables; this module writes the results
from them into the database. The statements are the same on both databases; only how
many rows one transaction takes differs.

**PostgreSQL: one transaction.** The run finds and records in one transaction, which
also finishes the run (:mod:`reconciler.engine`), so readers see a run ``running`` with
no results, or finished with all of them. It blocks nothing else meanwhile: it locks
only the connection's exceptions it writes (which only runs of the connection, taking
turns, and finance's actions on them write) and the rows it inserts; the receiver, the
worker and imports never wait for it.

**SQLite: short steps.** SQLite has one write lock for the whole database, which every
webhook's insert needs: one transaction that opens or closes a million exceptions holds
it for seconds. So the exception findings are recorded in batches of findings, then the
exceptions to close in batches of those, each batch in its own short transaction, sized
from how long the previous one took and followed by a pause, as the ledger import does
(:mod:`reconciler.ledger`): a writer beside the run waits for one batch at most. Which
exceptions the run closes is decided while finding (:func:`plan_closing`, in the read
transaction): those of the period no finding names, so no batch has to search for them.

What readers see meanwhile, and why it is safe:

* Each batch writes an exception and its event together: every exception's state agrees
  with its history at every moment. Totals and the run's end come last, in one
  transaction: the run stays ``running``, with no totals, until every batch is stored.
* Runs of a connection still take turns (:mod:`reconciler.turns`) for the whole run,
  every batch included: no other run writes the connection's exceptions in between.
  Finance may resolve or accept an exception between two batches: a batch reads the
  state it finds (a resolved exception found again stays resolved, one no longer found
  is closed), as it would had finance acted just before the run.
* A run that stops between batches (an error, or its process killed) has recorded part
  of what it found, each part true when written: exceptions it opened exist, those it
  saw are refreshed, those it closed are closed; the rest are as before the run.
  Nothing is doubled: the exceptions are unique by subject, and a later run finds each
  one again and sees (or closes) it. An error marks the run ``failed`` at once; a killed
  run is marked ``failed`` by the next run of its connection (:func:`fail_interrupted`:
  a ``running`` run with events, seen by a run that holds the connection's turn, cannot
  be under way). Reconciling the period again completes its work: its report (totals,
  exceptions seen, closed) is then whole.
"""

# The SQL below is assembled from this module's constants (table names, category values,
# dialect spellings), never from data: every value goes through a bind parameter.
# ruff: noqa: S608

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from reconciler.findings import EXCEPTION_FINDINGS, TOTALS, execute
from storage.pacing import SQLITE_PAUSE, next_batch_size

logger = logging.getLogger(__name__)

BATCH_ROWS = 5000
"""The most findings (or exceptions to close) one SQLite write transaction records;
fewer when the machine is slow: each batch is sized from how long the previous one
took, toward the ledger import's :data:`~storage.pacing.BATCH_SECONDS`."""

FIRST_BATCH_ROWS = 500
"""The first batch's size, before any has been timed."""

CLOSING = "recon_closing"
"""The temporary table of the exceptions a run closes (SQLite), by id."""

INTERRUPTED = (
    "interrupted while recording its results (its process ended): what it recorded "
    "stands; reconcile its period again to complete it"
)
"""The error of a run that :func:`fail_interrupted` finds stopped part-way."""

_ACTIVE = "'open', 'resolved', 'accepted'"

_RECORD_TOTALS_SQL = f"""
    INSERT INTO recon_total (
        recon_run_id, currency, category, count, ledger_amount, venue_amount
    )
    SELECT :run_id, currency, category, count, ledger_amount, venue_amount
    FROM {TOTALS}
"""

_IN_BATCH = "AND f.rowid > :after AND f.rowid <= :upto"
"""The findings of one batch: a range of the temporary table's rowids (SQLite)."""


def record_at_once(connection: sa.Connection, params: dict[str, Any]) -> None:
    """PostgreSQL: write the run's totals and merge every exception in the caller's
    transaction."""
    execute(connection, _RECORD_TOTALS_SQL, params)
    for sql in (*_merge_statements(postgresql=True), *_close_statements(postgresql=True)):
        execute(connection, sql, params)


def plan_closing(connection: sa.Connection, params: dict[str, Any]) -> None:
    """SQLite, in the run's read transaction: which exceptions the run will close.

    Those of the connection that are open, resolved or accepted, whose subject lies in
    the period, and that no exception finding names (a finding's exception is seen, not
    closed), in order of id into the temporary table :data:`CLOSING`. Only runs of the
    connection (taking turns) change these columns, so the list still holds when the
    batches close them; each batch checks them again all the same.
    """
    execute(connection, f"DROP TABLE IF EXISTS temp.{CLOSING}", params)
    execute(connection, f"CREATE TEMPORARY TABLE {CLOSING} (id BIGINT NOT NULL)", params)
    execute(
        connection,
        f"""
        INSERT INTO temp.{CLOSING} (id)
        SELECT e.id FROM recon_exception e
        WHERE e.connection_id = :connection_id AND e.state IN ({_ACTIVE})
          AND e.subject_at >= :period_from AND e.subject_at < :period_to
          AND NOT EXISTS (
              SELECT 1 FROM {EXCEPTION_FINDINGS} f
              WHERE f.subject_key = e.subject_key AND f.category = e.category
          )
        ORDER BY e.id
        """,
        params,
    )


def record_in_steps(
    connection: sa.Connection,
    params: dict[str, Any],
    finish: Callable[[sa.Connection], object],
) -> int:
    """SQLite: record the run's results in short write transactions, then finish it.

    First the runs of the connection that a killed process left ``running`` part-way
    are marked failed (:func:`fail_interrupted`); then the exception findings are
    merged, then the exceptions of :data:`CLOSING` closed, a batch per transaction (each
    ``BEGIN IMMEDIATE``, as the caller set the connection); last, one transaction writes
    the totals and calls ``finish`` (which ends the run).

    Args:
        connection: the run's connection, holding its temporary tables.
        params: the run's bind parameters.
        finish: writes the run's end, in the last transaction.

    Returns:
        How many write transactions recorded the run.
    """
    most = max(BATCH_ROWS, 1)
    steps = (
        (EXCEPTION_FINDINGS, _merge_statements(postgresql=False)),
        (CLOSING, _close_statements(postgresql=False)),
    )
    with connection.begin():
        fail_interrupted(connection, params)
        # The temporary tables' rows are numbered 1..n in the order they were filled.
        sizes = [
            connection.exec_driver_sql(f"SELECT MAX(rowid) FROM temp.{table}").scalar() or 0
            for table, _ in steps
        ]
    transactions = 1
    for (table, statements), last in zip(steps, sizes, strict=True):
        transactions += _in_batches(connection, params, table, statements, last, most)
    with connection.begin():
        execute(connection, _RECORD_TOTALS_SQL, params)
        finish(connection)
    return transactions + 1


def _in_batches(
    connection: sa.Connection,
    params: dict[str, Any],
    table: str,
    statements: list[str],
    last: int,
    most: int,
) -> int:
    """Run ``statements`` over ``table``'s rows ``1..last``, a batch per transaction."""
    after, size, batches = 0, min(most, FIRST_BATCH_ROWS), 0
    while after < last:
        upto = min(after + size, last)
        began = time.perf_counter()
        with connection.begin():
            for sql in statements:
                execute(connection, sql, {**params, "after": after, "upto": upto})
        held = time.perf_counter() - began
        batches += 1
        logger.debug("run %s: %s rows %s..%s in %.3fs", params["run_id"], table, after, upto, held)
        after = upto
        size = next_batch_size(size, held, most)
        if after < last:
            # Leave the lock free long enough for every writer that waited meanwhile.
            time.sleep(SQLITE_PAUSE)
    return batches


def fail_interrupted(connection: sa.Connection, params: dict[str, Any]) -> None:
    """Mark failed the runs of the connection that stopped part-way through recording.

    Called by a run holding the connection's turn: no other run of the connection is
    recording, so one still ``running`` that has written events (only a run recording
    does, and its last transaction finishes it) was stopped between its batches.
    """
    result = connection.execute(
        sa.text(
            """
            UPDATE recon_run SET state = 'failed', error = :error
            WHERE connection_id = :connection_id AND state = 'running' AND id <> :run_id
              AND EXISTS (SELECT 1 FROM exception_event v WHERE v.recon_run_id = recon_run.id)
            RETURNING id
            """
        ),
        {**params, "error": INTERRUPTED},
    )
    for (run_id,) in result:
        logger.warning("reconciliation run %s %s", run_id, INTERRUPTED)


def _merge_statements(*, postgresql: bool) -> list[str]:
    """Open, see and reopen the exceptions of the exception findings.

    On SQLite, of one batch of findings (``:after``, ``:upto``), each statement driven by
    the batch: ``CROSS JOIN`` keeps SQLite's planner from walking every exception of
    the connection (through its index) for each batch's few rows.
    """
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
    batch = "" if postgresql else _IN_BATCH
    join = "JOIN" if postgresql else "CROSS JOIN"
    found = f"{EXCEPTION_FINDINGS} f {join} recon_exception e ON {same}"
    refreshed = f"""
            state = CASE WHEN state = 'closed' THEN 'open' ELSE state END,
            closed_run_id = NULL,
            last_seen_run_id = :run_id,
            ledger_line_id = f.line_id,
            venue_order_id = f.order_pk,
            currency = f.currency,
            ledger_amount = f.ledger_amount,
            venue_amount = f.venue_amount,
            details = {details},
            subject_at = f.subject_at,
            updated_at = :now"""
    if postgresql:
        update = f"""
        UPDATE recon_exception SET {refreshed}
        FROM {EXCEPTION_FINDINGS} f
        WHERE recon_exception.connection_id = :connection_id
          AND recon_exception.category = f.category
          AND recon_exception.subject_key = f.subject_key
        """
    else:
        # The batch's findings with their exceptions' ids, materialized first: from a
        # flattened subquery SQLite's planner would walk the table for each finding.
        update = f"""
        WITH f AS MATERIALIZED (
            SELECT f.*, e.id AS exception_id FROM {found} WHERE 1 = 1 {batch}
        )
        UPDATE recon_exception SET {refreshed}
        FROM f WHERE recon_exception.id = f.exception_id
        """
    return [
        # Known exceptions found again: the event first, while the old state is there.
        f"""
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT e.id, :run_id,
               CASE WHEN e.state = 'closed' THEN 'reopened' ELSE 'seen' END,
               :actor, NULL, :now
        FROM {found}
        WHERE 1 = 1 {batch}
        """,
        update,
        f"""
        INSERT INTO recon_exception (
            connection_id, category, subject_key, ledger_line_id, venue_order_id, currency,
            ledger_amount, venue_amount, details, subject_at, state, first_seen_run_id,
            last_seen_run_id, closed_run_id, first_seen_at, updated_at
        )
        SELECT :connection_id, f.category, f.subject_key, f.line_id, f.order_pk, f.currency,
               f.ledger_amount, f.venue_amount, {details}, f.subject_at, 'open', :run_id,
               :run_id, NULL, :now, :now
        FROM {EXCEPTION_FINDINGS} f
        WHERE NOT EXISTS (SELECT 1 FROM recon_exception e WHERE {same}) {batch}
        """,
        f"""
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT e.id, :run_id, 'opened', :actor, NULL, :now
        FROM {found}
        WHERE e.first_seen_run_id = :run_id {batch}
        """,
    ]


def _close_statements(*, postgresql: bool) -> list[str]:
    """Close the exceptions of the period the run did not find again.

    On PostgreSQL, found by those conditions; on SQLite, one batch of :data:`CLOSING`
    (``:after``, ``:upto``), looked up by id (the conditions checked again on each row,
    their ``+`` keeping SQLite's planner from the connection's index instead).
    """
    if postgresql:
        stale = f"""
            connection_id = :connection_id AND state IN ({_ACTIVE})
            AND subject_at >= :period_from AND subject_at < :period_to
            AND last_seen_run_id <> :run_id"""
        closing = f"FROM recon_exception WHERE {stale}"
        where = stale
    else:
        stale = f"""
            +connection_id = :connection_id AND +state IN ({_ACTIVE})
            AND +subject_at >= :period_from AND +subject_at < :period_to
            AND +last_seen_run_id <> :run_id"""
        closing = f"""FROM temp.{CLOSING} c CROSS JOIN recon_exception ON recon_exception.id = c.id
        WHERE c.rowid > :after AND c.rowid <= :upto AND {stale}"""
        where = f"""id IN (SELECT id FROM temp.{CLOSING} WHERE rowid > :after AND rowid <= :upto)
            AND {stale}"""
    return [
        f"""
        INSERT INTO exception_event (recon_exception_id, recon_run_id, action, actor, note, at)
        SELECT recon_exception.id, :run_id, 'closed', :actor, NULL, :now
        {closing}
        """,
        f"""
        UPDATE recon_exception
        SET state = 'closed', closed_run_id = :run_id, updated_at = :now
        WHERE {where}
        """,
    ]
