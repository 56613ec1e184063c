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
a run reads one row per sale and per order, never an item or a wallet, and it reads the
period's rows through indexes by time, not the history (:mod:`reconciler.findings`).

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
transaction, which also finishes the run: readers see a run ``running`` with no
results, or finished with all of them. SQLite finds in a read transaction (into TEMP
tables, which take no lock on the database's file) and records in short write
transactions, a batch of exceptions each, the totals and the run's end last
(:mod:`reconciler.recording` says why, and what readers see meanwhile): SQLite's single
write lock, which every webhook needs, is never held for long, however many exceptions
a run opens or closes. On a failure the run is recorded ``failed`` with the error, then
:class:`ReconRunFailed` is raised: nothing of it is stored on PostgreSQL; on SQLite the
batches it committed stay, each whole, and the next run of its period completes them.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from reconciler.findings import TABLES, find
from reconciler.recording import CLOSING, plan_closing, record_at_once, record_in_steps
from reconciler.turns import take_turn_postgresql, take_turn_sqlite
from storage.engine import SQLITE_BEGIN_OPTION
from storage.records import ReconRun, ReconRunState, ReconTrigger
from storage.sqlite_writes import SQLITE_BULK_OPTION
from storage.types import to_micros

logger = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 500
"""How much of a failure's message the run row keeps."""


class ReconRunFailed(RuntimeError):
    """A run failed; its row records the error, and its work was rolled back (SQLite:
    its unfinished batch; those committed stay, :mod:`reconciler.recording`).

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
                find(connection, params, postgresql=True)
                record_at_once(connection, params)
                connection.execute(finish, {"finished_at": _finished(now, started)})
        else:
            with take_turn_sqlite(engine, connection_id, run_id), engine.connect() as connection:
                # The findings are computed in a read transaction into TEMP tables, which
                # live in the connection's own temporary database: no write lock on the
                # database's file. Only the writes take it, in short transactions
                # (reconciler.recording), so a webhook waits for one batch at most.
                connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
                try:
                    with connection.begin():
                        find(connection, params, postgresql=False)
                        plan_closing(connection, params)
                    # The long read kept the WAL from being checkpointed; catch up here
                    # (PASSIVE: writers go on), not in the next webhook's commit.
                    driver = connection.connection.driver_connection
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
                    # Bulk work: a webhook waiting for the lock goes before each batch.
                    connection.execution_options(
                        **{SQLITE_BEGIN_OPTION: "IMMEDIATE", SQLITE_BULK_OPTION: True}
                    )
                    record_in_steps(
                        connection,
                        params,
                        lambda c: c.execute(finish, {"finished_at": _finished(now, started)}),
                    )
                finally:
                    # The pooled connection keeps its TEMP tables until they are dropped.
                    connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
                    with connection.begin():
                        for table in (*TABLES, CLOSING):
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
