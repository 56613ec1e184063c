"""The shop's change feed: each order stamped with the commit that last changed it.

The shop reads "every order that changed after cursor X" (``GET /api/orders``), so a
change must be numbered in the order changes become visible — commit order — or a reader
could pass a number whose transaction commits later and never see its change. Numbers
taken from a sequence or an id are handed out in start order, not commit order, so
:func:`register_change_hooks` does this on every session of otacm's factories:

- after each flush, the mirror orders whose shop-visible content changed are noted: an
  order added, removed or with a change to a field of :data:`SHOP_FIELDS`, and any order
  whose lines, wallets, assets or timeline gained, lost or changed a row;
- just before the transaction commits, one number is taken for all of them from the
  ``mirror`` row of :class:`~storage.records.ChangeCounter` (``UPDATE … value + 1``) and
  written on each (``VenueOrder.change_seq``, with ``changed_at``).

The counter's row stays locked from that update to the commit, so the next transaction
to number its changes waits for this one to commit and takes the next number: numbers
rise in commit order on PostgreSQL, and on SQLite, whose writers run one at a time,
trivially. The wait is only the end of the transaction (a flush and an update), and only
transactions that change what the shop reads take part: webhooks, the inbox and the
ledger never do. A transaction rolled back numbers nothing.

Writes that bypass the ORM's unit of work (``UPDATE`` statements) are not seen here; the
mirror uses them only to blank customers' names and e-mails, which is no change of an
order's fate.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from storage.models import Asset, OrderItem, StatusChange, VenueOrder, Wallet
from storage.records import ChangeCounter
from storage.types import utcnow

COUNTER = "mirror"
"""The :class:`~storage.records.ChangeCounter` row that numbers the mirror's changes."""

SHOP_FIELDS = frozenset(
    {
        "status",
        "status_message",
        "status_changed_at",
        "buy_from_order_reference",
        "received_at",
        "payment_reference",
        "job_id",
        "manifest_url",
        "sell_to_language",
        "removed_at",
        "items",
    }
)
"""The fields of :class:`~storage.models.VenueOrder` the shop reads; a change to another
(``row_version``, ``fetched_at``, totals, customers' names) is bookkeeping, not news."""

_CHANGED = "otacm.changed_orders"
"""The key in ``Session.info`` of the ids of orders changed in the current transaction."""


def register_change_hooks(sessions: sessionmaker[Session]) -> None:
    """Number the shop-visible changes of every session of ``sessions`` (module docstring).

    On the factory, as :func:`storage.flush.register_flush_hooks` does, so importing this
    module changes nothing.
    """
    sa.event.listen(sessions, "after_flush", _note_changed_orders)
    sa.event.listen(sessions, "before_commit", _stamp_changed_orders)
    sa.event.listen(sessions, "after_transaction_end", _forget)


def _note_changed_orders(session: Session, flush_context: Any) -> None:
    changed: set[int] = session.info.setdefault(_CHANGED, set())
    for row in (*session.new, *session.dirty, *session.deleted):
        order_id = _order_of(session, row)
        if order_id is not None:
            changed.add(order_id)


def _order_of(session: Session, row: object) -> int | None:
    """The id of the mirror order whose shop-visible content ``row``'s change changes."""
    if isinstance(row, VenueOrder):
        if row in session.new or row in session.deleted:
            return row.id
        state = sa.inspect(row)
        if any(state.attrs[name].history.has_changes() for name in SHOP_FIELDS):
            return row.id
        return None
    if isinstance(row, StatusChange):
        return row.venue_order_id
    if isinstance(row, OrderItem):
        return row.venue_order_id
    if isinstance(row, Wallet):
        return row.item.venue_order_id if row.item is not None else None
    if isinstance(row, Asset):
        wallet = row.wallet
        return wallet.item.venue_order_id if wallet is not None and wallet.item else None
    return None


def _stamp_changed_orders(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: the number is taken when the transaction commits
    session.flush()  # what is still pending is noted too
    changed: set[int] = session.info.pop(_CHANGED, set())
    if not changed:
        return
    seq = next_change_number(session)
    now = utcnow()
    ids = sorted(changed)
    for start in range(0, len(ids), 500):
        session.execute(
            sa.update(VenueOrder)
            .where(VenueOrder.id.in_(ids[start : start + 500]))
            .values(change_seq=seq, changed_at=now),
            execution_options={"synchronize_session": False},
        )
    for row in session.identity_map.values():
        if isinstance(row, VenueOrder) and row.id in changed:
            sa.orm.attributes.set_committed_value(row, "change_seq", seq)
            sa.orm.attributes.set_committed_value(row, "changed_at", now)


def next_change_number(session: Session) -> int:
    """Take the next number of the mirror's counter; its row stays locked until commit."""
    bump = (
        sa.update(ChangeCounter)
        .where(ChangeCounter.name == COUNTER)
        .values(value=ChangeCounter.value + 1)
        .returning(ChangeCounter.value)
    )
    seq = session.execute(bump, execution_options={"synchronize_session": False}).scalar()
    if seq is None:
        # The first numbered commit of this database: create the row, once, then bump.
        insert = (
            postgresql.insert(ChangeCounter)
            if session.get_bind().dialect.name == "postgresql"
            else sqlite.insert(ChangeCounter)
        )
        session.execute(insert.values(name=COUNTER, value=0).on_conflict_do_nothing())
        seq = session.execute(bump, execution_options={"synchronize_session": False}).scalar_one()
    return int(seq)


def _forget(session: Session, transaction: SessionTransaction) -> None:
    # Only when the whole transaction ends: a savepoint rolled back (an insert that met
    # its twin) leaves the changes flushed before it to be numbered at commit.
    if transaction.parent is None:
        session.info.pop(_CHANGED, None)
