"""Customers' names and e-mails: erased after their visit, or at once when a person asks.

What holds them: the mirror (``venue_order`` and ``order_item``: ``sellToName`` and
``sellToEmail`` of the header and of each line; ``wallet.name``, the holder), the
ledger's and the outbox's order requests (the same fields and each line's
``wallet.names``, inside JSON), and, should the venue ever send any, the inbox's
notification bodies. Erasing sets the columns to NULL and removes those keys from the
JSON (:func:`without_personal_data`); amounts, references, orderIds, ticket and coupon
numbers, visit dates and statuses stay, so reconciliation and finance see every sale as
before. An erased order stays erased: the venue keeps its names and hands them back
with each getOrder, which the mirror then stores without them
(:func:`storage.flush._keep_erased_orders_erased`).

:func:`erase_due` is the scheduled job ``erase_personal_data``. An order is due
``keep_days`` after its latest visit date (or, when its lines carry none, after otacm
first saw it), a sale after the latest visit date of its request; a sale imported from
the shop's export has no request and holds nothing to erase. Both tables keep
``personal_data_erased_at`` and ``last_visit_date`` under one index, so each run reads
only rows not yet erased whose visit is past: the cost follows what became due since
the last run, not the history. Work goes in batches of :data:`BATCH` rows, each its own
short transaction, set-based but for the JSON, which is rewritten row by row in one
``executemany``. A processed notification (inbox ``done``) is deleted ``keep_days``
after it was processed: nothing reads it again (the worker reads a row's columns, never
its body, and only while it is pending; replay takes only dead letters, which stay).

:func:`erase_subject` answers a data subject's request (``otacm privacy erase``): every
order whose header or a line carries the e-mail address (or that the reference names),
the sales of those orders, sales and calls whose request mentions the address, and
their inbox rows — erased now, in one transaction, with a :class:`PrivacyErasure` record
that keeps the address's hash, never the address.

Either way, a call still waiting to be sent (outbox ``pending`` or ``leased``) keeps its
body: the venue must get it as decided. The scheduled erasure waits for such a sale or
order; a request reports the calls it left (run it again once they are sent).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import erase_customers
from storage.models import (
    REFERENCE,
    Base,
    Inbox,
    InboxState,
    LedgerLine,
    OrderItem,
    Outbox,
    OutboxState,
    VenueOrder,
)
from storage.records import ErasureKind, PrivacyErasure
from venue.values import canonical_guid, normalize_reference

logger = logging.getLogger(__name__)

BATCH = 500
"""Rows per transaction of the scheduled erasure."""

MAX_BATCHES = 200
"""Batches of each kind one run erases at most; the next run goes on (a first run over a
long history is spread over a few runs rather than holding the scheduler)."""

PERSONAL_KEYS = frozenset({"selltoname", "selltoemail", "names"})
"""The JSON keys (compared without case) whose values are customers' names or e-mails:
``sellToName`` and ``sellToEmail`` (header and lines) and a line's ``wallet.names``."""

RETENTION_ACTOR = "otacm"
"""The actor of the scheduled erasure's records."""

UNFINISHED = (OutboxState.PENDING, OutboxState.LEASED)
"""Outbox states whose body the sender still needs."""


@dataclass
class ErasureReport:
    """What an erasure changed, in rows per table.

    Attributes:
        orders: mirrored orders erased (with their lines and wallets).
        ledger_lines: sales whose request was erased.
        outbox_rows: calls whose body was erased.
        inbox_rows: notifications deleted (scheduled) or whose body was erased (request).
        kept_unsent: calls left whole because they are still to be sent.
    """

    orders: int = 0
    ledger_lines: int = 0
    outbox_rows: int = 0
    inbox_rows: int = 0
    kept_unsent: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by name, for logs, ``--json`` and the erasure record."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def erased(self) -> int:
        """The rows changed in all."""
        return self.orders + self.ledger_lines + self.outbox_rows + self.inbox_rows


def without_personal_data(value: Any, also: Collection[str] = ()) -> Any:
    """``value`` (decoded JSON) without customers' names and e-mails, at any depth.

    Removes every key of :data:`PERSONAL_KEYS`, and any string equal (without case) to
    one of ``also`` (an address a person asked to erase, under whatever key).

    Args:
        value: a stored request or notification body.
        also: further values to remove, lower-cased.
    """
    if isinstance(value, dict):
        return {
            key: without_personal_data(item, also)
            for key, item in value.items()
            if key.lower() not in PERSONAL_KEYS and not _matches(item, also)
        }
    if isinstance(value, list):
        return [without_personal_data(item, also) for item in value if not _matches(item, also)]
    return value


def _matches(value: Any, also: Collection[str]) -> bool:
    return isinstance(value, str) and value.strip().lower() in also


def email_hash(email: str) -> str:
    """The SHA-256 (hex) of an address as compared: trimmed, lower-cased."""
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


# --- the scheduled erasure ------------------------------------------------------------


def erase_due(
    sessions: sessionmaker[Session],
    *,
    now: dt.datetime,
    keep_days: int,
    batch_size: int = BATCH,
    max_batches: int = MAX_BATCHES,
) -> ErasureReport:
    """Erase the names and e-mails ``keep_days`` past their visit (module docstring).

    Args:
        sessions: the session factory; each batch commits on its own.
        now: the current time (aware).
        keep_days: days after the visit date that personal data is kept.
        batch_size: rows per transaction.
        max_batches: batches of each kind in this run at most.

    Returns:
        What the run erased; recorded as a :class:`PrivacyErasure` when anything.
    """
    report = ErasureReport()
    cutoff = now - dt.timedelta(days=keep_days)
    cutoff_date = cutoff.date()
    for due in _due_orders(cutoff):
        for _ in range(max_batches):
            with sessions.begin() as session:
                pks = session.scalars(due.limit(batch_size)).all()
                if not pks:
                    break
                report.outbox_rows += _erase_orders(session, pks, now)
                report.orders += len(pks)
    for _ in range(max_batches):
        with sessions.begin() as session:
            lines = session.execute(_due_lines(cutoff_date).limit(batch_size)).all()
            if not lines:
                break
            report.outbox_rows += _erase_lines(session, lines, now)
            report.ledger_lines += len(lines)
    for _ in range(max_batches):
        with sessions.begin() as session:
            done = (
                sa.select(Inbox.id)
                .where(Inbox.state == InboxState.DONE, Inbox.next_attempt_at < cutoff)
                .limit(batch_size)
            )
            deleted = _rowcount(
                session.execute(
                    sa.delete(Inbox)
                    .where(Inbox.id.in_(done.scalar_subquery()))
                    .execution_options(synchronize_session=False)
                )
            )
        report.inbox_rows += deleted
        if deleted < batch_size:
            break
    if report.erased:
        with sessions.begin() as session:
            _record(
                session,
                ErasureKind.RETENTION,
                RETENTION_ACTOR,
                f"visits before {cutoff_date.isoformat()}",
                None,
                report,
                now,
            )
        logger.info("personal data past %s erased: %s", cutoff_date, report.as_dict())
    return report


def _due_orders(cutoff: dt.datetime) -> tuple[sa.Select[int], sa.Select[int]]:
    """Orders not erased whose last visit is before ``cutoff``, oldest first; then those
    without a visit date that otacm first saw before it.

    Both read the partial index of the rows not erased; ordered by it, so that
    PostgreSQL walks the index rather than the table (under a LIMIT, it otherwise bets
    on finding due rows early in a scan of the whole table). An order with a call still
    to send waits for it.
    """
    waiting_call = sa.exists().where(
        Outbox.order_id == VenueOrder.order_id,
        Outbox.connection_id == VenueOrder.connection_id,
        Outbox.state.in_(UNFINISHED),
    )
    not_erased = VenueOrder.personal_data_erased_at.is_(None)
    dated = (
        sa.select(VenueOrder.id)
        .where(not_erased, VenueOrder.last_visit_date < cutoff.date(), ~waiting_call)
        .order_by(VenueOrder.last_visit_date)
    )
    undated = sa.select(VenueOrder.id).where(
        not_erased,
        VenueOrder.last_visit_date.is_(None),
        VenueOrder.first_seen_at < cutoff,
        ~waiting_call,
    )
    return dated, undated


def _due_lines(cutoff_date: dt.date) -> sa.Select[int, dict[str, Any] | None]:
    """Sales not erased whose request's last visit is before ``cutoff_date``, oldest first.

    Sales without a request (imported) have no visit date and nothing to erase. A sale
    with a call still to send waits for it.
    """
    waiting_call = sa.exists().where(
        Outbox.ledger_line_id == LedgerLine.id, Outbox.state.in_(UNFINISHED)
    )
    return (
        sa.select(LedgerLine.id, LedgerLine.request)
        .where(
            LedgerLine.personal_data_erased_at.is_(None),
            LedgerLine.last_visit_date < cutoff_date,
            ~waiting_call,
        )
        .order_by(LedgerLine.last_visit_date)
    )


# --- erasing rows ---------------------------------------------------------------------


def _erase_orders(session: Session, pks: Sequence[int], now: dt.datetime) -> int:
    """Erase these mirrored orders, their lines, wallets and finished calls; calls erased."""
    if not pks:
        return 0
    chosen = sorted(pks)
    erase_customers(session, chosen, now)
    # The calls on these orders (an order's calls name it by orderId and connection).
    keys = session.execute(
        sa.select(VenueOrder.connection_id, VenueOrder.order_id).where(VenueOrder.id.in_(chosen))
    ).all()
    by_order = {(row.connection_id, row.order_id) for row in keys}
    calls = session.execute(
        sa.select(Outbox.id, Outbox.connection_id, Outbox.order_id, Outbox.request).where(
            Outbox.order_id.in_(sorted({order_id for _, order_id in by_order})),
            Outbox.state.not_in(UNFINISHED),
            Outbox.request.is_not(None),
        )
    ).all()
    return _scrub_calls(
        session, [(c.id, c.request) for c in calls if (c.connection_id, c.order_id) in by_order]
    )


def _erase_lines(
    session: Session,
    lines: Sequence[Any],
    now: dt.datetime,
    also: Collection[str] = (),
) -> int:
    """Erase these sales' requests and their finished calls' bodies; calls erased."""
    if not lines:
        return 0
    table = _table(LedgerLine)
    # Core, not the ORM: the mapping's validator would take the erased request for the
    # shop's new one.
    session.connection().execute(
        sa.update(table)
        .where(table.c.id == sa.bindparam("line_id"))
        .values(
            request=sa.bindparam("body", type_=sa.JSON),
            personal_data_erased_at=sa.func.coalesce(
                table.c.personal_data_erased_at, sa.bindparam("now", type_=table.c.updated_at.type)
            ),
        ),
        [{"line_id": line.id, "body": _erased(line.request, also), "now": now} for line in lines],
    )
    calls = session.execute(
        sa.select(Outbox.id, Outbox.request).where(
            Outbox.ledger_line_id.in_(sorted(line.id for line in lines)),
            Outbox.state.not_in(UNFINISHED),
            Outbox.request.is_not(None),
        )
    ).all()
    return _scrub_calls(session, [(c.id, c.request) for c in calls], also)


def _erased(body: dict[str, Any] | None, also: Collection[str]) -> dict[str, Any] | None:
    return None if body is None else without_personal_data(body, also)


def _scrub_calls(
    session: Session,
    calls: Iterable[tuple[int, dict[str, Any] | None]],
    also: Collection[str] = (),
) -> int:
    """Rewrite the bodies of these finished calls without personal data; how many changed.

    Only while a call is still finished: one made pending again meanwhile (a
    re-submission) carries the shop's new body.
    """
    changed = [
        {"row_id": row_id, "body": scrubbed}
        for row_id, body in calls
        if (scrubbed := _erased(body, also)) != body
    ]
    if changed:
        table = _table(Outbox)
        session.connection().execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("row_id"), table.c.state.not_in(UNFINISHED))
            .values(request=sa.bindparam("body", type_=sa.JSON)),
            changed,
        )
    return len(changed)


def _record(
    session: Session,
    kind: ErasureKind,
    actor: str,
    selector: str,
    connection_id: int | None,
    report: ErasureReport,
    now: dt.datetime,
) -> None:
    session.add(
        PrivacyErasure(
            at=now,
            kind=kind,
            actor=actor,
            selector=selector,
            connection_id=connection_id,
            counts=report.as_dict(),
        )
    )


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _table(model: type[Base]) -> sa.Table:
    return cast(sa.Table, model.__table__)


# --- a data subject's request ---------------------------------------------------------


class ErasureRefused(ValueError):
    """A request that names nothing to erase by: the message says what is wrong."""


@dataclass(frozen=True)
class SubjectErasure:
    """What :func:`erase_subject` did: the counts and the record's id.

    Attributes:
        report: the rows erased per table, and the calls kept.
        record_id: the :class:`PrivacyErasure` row written.
        selector: what the record keeps of the request (the address's hash, or the
            reference).
    """

    report: ErasureReport
    record_id: int
    selector: str


def erase_subject(
    sessions: sessionmaker[Session],
    *,
    email: str | None = None,
    reference: str | None = None,
    connection_id: int | None = None,
    actor: str,
    now: dt.datetime,
) -> SubjectErasure:
    """Erase one person's names and e-mails everywhere now, and record that it was done.

    Exactly one of ``email`` (compared without case; found in the mirror's headers and
    lines, and in any stored request or notification body) and ``reference`` (the
    shop's reference, the venue's ``buyFromOrderReference`` or the orderId, as ``otacm
    orders show`` finds an order) names the person's orders. Their orders, sales, calls
    and notifications are erased in one transaction with the record (module docstring).
    Finding nothing is no error: the record says zero, and a request run again finds
    nothing left.

    Args:
        sessions: the session factory; one transaction.
        email: the person's e-mail address.
        reference: an order's reference or orderId.
        connection_id: only this connection's rows; ``None`` for every connection.
        actor: who carries the request out (at most 100 characters).
        now: when (aware).

    Raises:
        ErasureRefused: neither or both selectors, a blank one, or one too long to record.
    """
    if (email is None) == (reference is None):
        raise ErasureRefused("name the person by exactly one of an e-mail address or a reference")
    selected = (email if email is not None else reference or "").strip()
    if not selected:
        raise ErasureRefused("the e-mail address or reference is empty")
    if email is not None and "@" not in selected:
        raise ErasureRefused("an e-mail address has an @")
    limit = REFERENCE.length or 0
    if reference is not None and len(selected) > limit:
        raise ErasureRefused(f"a reference has at most {limit} characters")
    if not actor.strip() or len(actor) > 100:
        raise ErasureRefused("the actor is 1 to 100 characters")
    address = selected.lower() if email is not None else None
    report = ErasureReport()
    with sessions.begin() as session:
        order_pks = _subject_orders(session, address, selected, connection_id)
        orders = session.execute(
            sa.select(
                VenueOrder.id,
                VenueOrder.connection_id,
                VenueOrder.partner_id,
                VenueOrder.reference_key,
                VenueOrder.order_id,
            ).where(VenueOrder.id.in_(order_pks))
        ).all()
        line_rows = _subject_lines(session, orders, address, selected, connection_id)
        also = () if address is None else (address,)
        report.outbox_rows = _erase_orders(session, [order.id for order in orders], now)
        report.outbox_rows += _erase_lines(session, line_rows, now, also)
        report.orders, report.ledger_lines = len(orders), len(line_rows)
        # Every call on these orders and sales, and any whose body holds the address.
        call_filter = [
            Outbox.ledger_line_id.in_([line.id for line in line_rows]),
            sa.and_(
                Outbox.order_id.in_(sorted({order.order_id for order in orders})),
                Outbox.connection_id.in_(sorted({order.connection_id for order in orders})),
            ),
        ]
        if address is not None:
            call_filter.append(_mentions(Outbox.request, address))
        calls = session.execute(
            _in_connection(
                sa.select(Outbox.id, Outbox.state, Outbox.request).where(sa.or_(*call_filter)),
                Outbox.connection_id,
                connection_id,
            )
        ).all()
        report.kept_unsent = sum(1 for call in calls if call.state in UNFINISHED)
        report.outbox_rows += _scrub_calls(
            session,
            [(c.id, c.request) for c in calls if c.state not in UNFINISHED],
            also,
        )
        report.inbox_rows = _scrub_notifications(session, orders, address, connection_id)
        selector = email_hash(selected) if email is not None else selected
        record = PrivacyErasure(
            at=now,
            kind=ErasureKind.EMAIL if email is not None else ErasureKind.REFERENCE,
            actor=actor,
            selector=selector,
            connection_id=connection_id,
            counts=report.as_dict(),
        )
        session.add(record)
        session.flush()
        record_id = record.id
    logger.info(
        "personal data erased on request (record %d, by %s): %s",
        record_id,
        actor,
        report.as_dict(),
    )
    return SubjectErasure(report=report, record_id=record_id, selector=selector)


def _subject_orders(
    session: Session, address: str | None, selected: str, connection_id: int | None
) -> list[int]:
    if address is not None:
        lines = sa.select(OrderItem.venue_order_id).where(
            sa.func.lower(sa.func.trim(OrderItem.sell_to_email)) == address
        )
        condition = sa.or_(
            sa.func.lower(sa.func.trim(VenueOrder.sell_to_email)) == address,
            VenueOrder.id.in_(lines.scalar_subquery()),
        )
    else:
        key = normalize_reference(selected)
        condition = sa.or_(
            VenueOrder.order_id == canonical_guid(selected),
            VenueOrder.reference_key == key,
            VenueOrder.buy_from_order_reference == key,
        )
    query = _in_connection(
        sa.select(VenueOrder.id).where(condition), VenueOrder.connection_id, connection_id
    )
    return list(session.scalars(query))


def _subject_lines(
    session: Session,
    orders: Sequence[Any],
    address: str | None,
    selected: str,
    connection_id: int | None,
) -> list[Any]:
    conditions: list[sa.ColumnElement[bool]] = [
        sa.and_(
            LedgerLine.connection_id == order.connection_id,
            LedgerLine.partner_id == order.partner_id,
            LedgerLine.reference_key == order.reference_key,
        )
        for order in orders
    ]
    if address is not None:
        conditions.append(_mentions(LedgerLine.request, address))
    else:
        conditions.append(LedgerLine.reference_key == normalize_reference(selected))
    query = _in_connection(
        sa.select(LedgerLine.id, LedgerLine.request).where(sa.or_(*conditions)),
        LedgerLine.connection_id,
        connection_id,
    )
    return list(session.execute(query).all())


def _scrub_notifications(
    session: Session, orders: Sequence[Any], address: str | None, connection_id: int | None
) -> int:
    """Erase personal data from the notifications of these orders or mentioning ``address``.

    Any state: the worker reads a row's columns, never its body, so even a pending or
    dead row keeps working without it. A full scan of the inbox (no index by order or
    text), which a person's request can afford; the scheduled erasure never does this.
    """
    conditions: list[sa.ColumnElement[bool]] = []
    for connection, order_ids in _order_ids_by_connection(orders).items():
        conditions.append(
            sa.and_(Inbox.connection_id == connection, Inbox.order_id.in_(sorted(order_ids)))
        )
    if address is not None:
        conditions.append(_mentions(Inbox.payload, address))
    if not conditions:
        return 0
    rows = session.execute(
        _in_connection(
            sa.select(Inbox.id, Inbox.payload).where(sa.or_(*conditions)),
            Inbox.connection_id,
            connection_id,
        )
    ).all()
    also = () if address is None else (address,)
    changed = [
        {"row_id": row.id, "body": scrubbed}
        for row in rows
        if (scrubbed := without_personal_data(row.payload, also)) != row.payload
    ]
    if changed:
        table = _table(Inbox)
        session.connection().execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("row_id"))
            .values(payload=sa.bindparam("body", type_=sa.JSON)),
            changed,
        )
    return len(changed)


def _order_ids_by_connection(orders: Sequence[Any]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for order in orders:
        found.setdefault(order.connection_id, set()).add(order.order_id)
    return found


def _mentions(column: Any, address: str) -> sa.ColumnElement[bool]:
    """Whether a JSON column's text holds ``address`` (lower-case), as JSON writes it."""
    written = json.dumps(address)[1:-1]
    escaped = written.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return sa.func.lower(sa.cast(column, sa.Text)).like(f"%{escaped}%", escape="\\")


def _in_connection(query: Any, column: Any, connection_id: int | None) -> Any:
    return query if connection_id is None else query.where(column == connection_id)
