"""The shop's change numbers: each commit that changes what the shop reads of orders
numbers them, in commit order (:mod:`storage.changes`)."""

from __future__ import annotations

import datetime as dt
import threading

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import record_row_version, upsert_order
from storage.models import ChangeSource, VenueOrder
from storage.records import ChangeCounter
from tests.storage.test_models import ORDER_ID, T0, connection_id, parse, wire_order
from venue.models import Order

__all__ = ["connection_id"]  # the fixture, used by name

OTHER_ORDER_ID = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


def order(
    status: str = "Submitted",
    *,
    order_id: str = ORDER_ID,
    reference: str = "SHOP-1001",
    minted: bool = False,
) -> Order:
    raw = wire_order(status, minted=minted)
    raw["orderId"] = order_id
    raw["sellToOrderReference"] = reference
    return parse(raw)


def store(
    sessions: sessionmaker[Session], connection_id: int, wire: Order, at: dt.datetime = T0
) -> int:
    with sessions.begin() as session:
        return upsert_order(
            session, connection_id, wire, source=ChangeSource.WEBHOOK, observed_at=at
        ).id


def numbers(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(sa.select(VenueOrder.order_id, VenueOrder.change_seq))
        return {order_id: seq for order_id, seq in rows}


def counter(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalars(sa.select(ChangeCounter.value)).one()


def test_each_commit_numbers_the_orders_it_changed(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Two orders stored, then one of them issued: 1, 2, then 3; an answer equal to the
    mirror, or a rowVersion noted, numbers nothing."""
    store(sessions, connection_id, order())
    store(sessions, connection_id, order(order_id=OTHER_ORDER_ID, reference="SHOP-1002"))
    assert numbers(sessions) == {ORDER_ID: 1, OTHER_ORDER_ID: 2}
    pk = store(sessions, connection_id, order("Issued", minted=True), T0 + dt.timedelta(1))
    assert numbers(sessions) == {ORDER_ID: 3, OTHER_ORDER_ID: 2}
    store(sessions, connection_id, order("Issued", minted=True), T0 + dt.timedelta(2))
    with sessions.begin() as session:
        record_row_version(session.get_one(VenueOrder, pk), 4242)
    assert (numbers(sessions), counter(sessions)) == ({ORDER_ID: 3, OTHER_ORDER_ID: 2}, 3)
    with sessions() as session:
        changed_at = session.get_one(VenueOrder, pk).changed_at
    assert changed_at is not None


def test_a_new_database_has_no_counter_row_until_a_commit_needs_it(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A migrated database holds no row of the counter (``otacm db restore`` takes only a
    bare schema); the first numbered commit creates it."""
    with sessions() as session:
        assert session.scalars(sa.select(ChangeCounter)).all() == []
    store(sessions, connection_id, order())
    assert counter(sessions) == 1


def test_a_rolled_back_change_numbers_nothing(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A transaction that changed an order and rolled back leaves the counter as it was."""
    store(sessions, connection_id, order())
    with sessions() as session:
        upsert_order(
            session,
            connection_id,
            order("Issued", minted=True),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
        session.rollback()
    assert (numbers(sessions), counter(sessions)) == ({ORDER_ID: 1}, 1)


def test_a_savepoint_rolled_back_keeps_the_changes_before_it(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """An order stored, then a savepoint that failed: the order is numbered at commit."""
    store(sessions, connection_id, order(order_id=OTHER_ORDER_ID, reference="SHOP-1002"))
    with sessions.begin() as session:
        upsert_order(session, connection_id, order(), source=ChangeSource.WEBHOOK, observed_at=T0)
        try:
            with session.begin_nested():
                session.add(ChangeCounter(name="mirror", value=99))  # its key exists
                session.flush()
        except sa.exc.IntegrityError:
            pass
    assert numbers(sessions) == {OTHER_ORDER_ID: 1, ORDER_ID: 2}


def test_numbers_follow_commit_order_not_start_order(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The first transaction takes its number and is held before its commit; a second,
    started later, commits only after it and takes the next number — so a reader that
    saw the second's number can never meet a lower one committed later."""
    store(sessions, connection_id, order())
    store(sessions, connection_id, order(order_id=OTHER_ORDER_ID, reference="SHOP-1002"))
    numbered, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def hold(session: Session) -> None:
        numbered.set()
        release.wait(30)

    def first() -> None:
        try:
            with sessions() as session:
                upsert_order(
                    session,
                    connection_id,
                    order("Issued", minted=True),
                    source=ChangeSource.WEBHOOK,
                    observed_at=T0,
                )
                # After the factory's own hook: the number is taken, the commit waits.
                sa.event.listen(session, "before_commit", hold)
                session.commit()
        except BaseException as exc:  # reported below
            failures.append(exc)

    def second() -> None:
        try:
            store(
                sessions,
                connection_id,
                order("Issued", order_id=OTHER_ORDER_ID, reference="SHOP-1002", minted=True),
            )
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert numbered.wait(30)
    threads.append(threading.Thread(target=second))
    threads[1].start()
    threads[1].join(0.5)
    waited = threads[1].is_alive()
    release.set()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert waited  # the second commit waited for the first
    assert numbers(sessions) == {ORDER_ID: 3, OTHER_ORDER_ID: 4}
