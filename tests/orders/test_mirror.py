"""The mirror's writes: whole orders, removals, other partners' orders (:mod:`orders.mirror`)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import foreign_order_ids, forget_foreign_orders, mark_removed, upsert_order
from storage.models import (
    Asset,
    ChangeSource,
    ForeignOrder,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
)
from storage.records import FeedCursor, FeedMark
from tests.storage.test_models import (
    ORDER_ID,
    PARTNER_ID,
    T0,
    ZERO_GUID,
    connection_id,
    count,
    parse,
    wire_order,
)
from venue.models import Order, OrderStatus

__all__ = ["connection_id"]  # the fixture, used by name

FOREIGN_PARTNER = "0f1e2d3c-4b5a-4968-8776-655443322110"
FOREIGN_ORDER_ID = "7e6d5c4b-3a29-4817-9605-f4e3d2c1b0a9"


def upsert_counts(order: Order) -> dict[str, int]:
    """The item, wallet, asset and status change rows one mirrored ``order`` has."""
    wallets = [wallet for item in order.items for wallet in item.wallets]
    return {
        "OrderItem": len(order.items),
        "Wallet": len(wallets),
        "Asset": sum(len(wallet.assets) for wallet in wallets),
        "StatusChange": 1,
    }


def test_upsert_stores_the_whole_order(sessions: sessionmaker[Session], connection_id: int) -> None:
    """Header, items, wallets with prices, assets and a first status change are stored."""
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            parse(wire_order("Issued", minted=True)),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )

    with sessions.begin() as session:
        order = session.scalars(sa.select(VenueOrder)).one()
        assert (order.order_id, order.status, order.reference_key) == (
            ORDER_ID,
            OrderStatus.ISSUED,
            "SHOP-1001",
        )
        assert order.buy_from_order_reference == "CM-20260515093000-A1B2"
        assert order.received_at == dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)
        assert order.status_message is None
        assert [item.line_no for item in order.items] == [100000, 200000]
        assert order.items[1].is_package
        assert order.items[0].visit_time == dt.time(10, 0)
        assert order.items[1].visit_time is None
        wallets = [wallet for item in order.items for wallet in item.wallets]
        assert [wallet.seq_no for wallet in wallets] == [1, 2, 3]
        assert wallets[2].unit_price_excl_vat == Decimal("333.333333")
        assert wallets[2].unit_price_incl_vat == Decimal("416.666666")
        assert wallets[0].issued_at == dt.datetime(2026, 5, 15, 9, 31, 2, tzinfo=dt.UTC)
        assert [asset.type for asset in wallets[0].assets] == ["ticket", "coupon"]
        assert wallets[0].assets[0].asset_row_id == "asset-row-1-1"
        assert count(session, Asset) == 6
        changes = [(c.status, c.source, c.observed_at) for c in order.status_changes]
        assert changes == [(OrderStatus.ISSUED, ChangeSource.WEBHOOK, T0)]


def test_upsert_with_new_status_appends_one_change_and_replaces_wallets(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Submitted shells, then the Issued order: one more status change, minted wallets only."""
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            parse(wire_order("Submitted")),
            source=ChangeSource.SUBMIT,
            observed_at=T0,
        )
    later = T0 + dt.timedelta(minutes=1)
    with sessions.begin() as session:
        order = upsert_order(
            session,
            connection_id,
            parse(wire_order("Issued", minted=True)),
            source=ChangeSource.POLL,
            observed_at=later,
        )
        order_pk = order.id

    with sessions.begin() as session:
        changes = session.execute(
            sa.select(StatusChange.status, StatusChange.source).order_by(StatusChange.id)
        ).all()
        assert changes == [
            (OrderStatus.SUBMITTED, ChangeSource.SUBMIT),
            (OrderStatus.ISSUED, ChangeSource.POLL),
        ]
        assert count(session, OrderItem) == 2
        assert count(session, Wallet) == 3
        assert count(session, Asset) == 6
        numbers = session.scalars(
            sa.select(Wallet.wallet_reference_number).order_by(Wallet.seq_no)
        ).all()
        assert numbers == ["WR-0001-EXT-1", "WR-0002-EXT-2", "WR-0003-EXT-3"]
        order = session.get_one(VenueOrder, order_pk)
        assert (order.status_changed_at, order.fetched_at, order.first_seen_at) == (
            later,
            later,
            T0,
        )


def test_identical_upsert_changes_nothing(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The same answer again appends no status change and rewrites no line or wallet."""
    answer = parse(wire_order("Issued", minted=True))
    with sessions.begin() as session:
        upsert_order(session, connection_id, answer, source=ChangeSource.WEBHOOK, observed_at=T0)
        wallet_ids = session.scalars(sa.select(Wallet.id).order_by(Wallet.id)).all()

    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            answer,
            source=ChangeSource.POLL,
            observed_at=T0 + dt.timedelta(seconds=15),
        )

    with sessions.begin() as session:
        assert count(session, StatusChange) == 1
        assert session.scalars(sa.select(Wallet.id).order_by(Wallet.id)).all() == wallet_ids


def test_upsert_records_a_new_status_message(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Error with another reason is a change too: finance sees each reason the venue gave."""
    first = wire_order("Error") | {"statusMessage": "Unknown item 'ADULT'"}
    second = wire_order("Error") | {"statusMessage": "stuck in Processing"}
    with sessions.begin() as session:
        for observed_at, raw in ((T0, first), (T0 + dt.timedelta(hours=1), second)):
            upsert_order(
                session,
                connection_id,
                parse(raw),
                source=ChangeSource.FETCH,
                observed_at=observed_at,
            )

    with sessions.begin() as session:
        messages = session.scalars(sa.select(StatusChange.status_message).order_by(StatusChange.id))
        assert list(messages) == ["Unknown item 'ADULT'", "stuck in Processing"]


def test_upsert_keeps_a_known_buy_from_reference(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """An older API answer without buyFromOrderReference does not erase the one known."""
    older_api = wire_order("Issued", minted=True)
    del older_api["buyFromOrderReference"]
    with sessions.begin() as session:
        upsert_order(
            session, connection_id, parse(wire_order()), source=ChangeSource.SUBMIT, observed_at=T0
        )
        order = upsert_order(
            session, connection_id, parse(older_api), source=ChangeSource.FETCH, observed_at=T0
        )

        assert order.buy_from_order_reference == "CM-20260515093000-A1B2"
        assert order.status == OrderStatus.ISSUED


def test_concurrent_first_upserts_make_one_order(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Two workers storing the same new order at once end with one row and both changes."""
    errors: list[BaseException] = []

    def second_worker() -> None:
        try:
            with sessions.begin() as session:
                upsert_order(
                    session,
                    connection_id,
                    parse(wire_order("Issued", minted=True)),
                    source=ChangeSource.POLL,
                    observed_at=T0 + dt.timedelta(seconds=1),
                )
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    with sessions.begin() as session:
        upsert_order(
            session, connection_id, parse(wire_order()), source=ChangeSource.SUBMIT, observed_at=T0
        )
        worker = threading.Thread(target=second_worker)
        worker.start()
        # Give the second worker time to block on this uncommitted order (on PostgreSQL
        # at the unique key, on SQLite at BEGIN IMMEDIATE) before committing.
        time.sleep(0.3)
    worker.join(timeout=30)

    assert not worker.is_alive()
    assert errors == []
    with sessions.begin() as session:
        assert count(session, VenueOrder) == 1
        statuses = session.scalars(sa.select(StatusChange.status).order_by(StatusChange.id))
        assert list(statuses) == [OrderStatus.SUBMITTED, OrderStatus.ISSUED]
        assert count(session, Wallet) == 3


def test_mark_removed_records_the_removal_once(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A 404 sets removed_at and appends one status change with no status; repeats add none."""
    gone = T0 + dt.timedelta(minutes=5)
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            parse(wire_order("Draft", minted=True)),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
    with sessions.begin() as session:
        removed = mark_removed(session, connection_id, ORDER_ID.upper(), gone, ChangeSource.POLL)
        again = mark_removed(
            session, connection_id, ORDER_ID, gone + dt.timedelta(minutes=1), ChangeSource.POLL
        )
        unknown = mark_removed(session, connection_id, ZERO_GUID, gone, ChangeSource.POLL)

    assert removed is not None
    assert again is removed
    assert unknown is None
    with sessions.begin() as session:
        order = session.scalars(sa.select(VenueOrder)).one()
        assert order.removed_at == gone
        assert [(c.status, c.observed_at) for c in order.status_changes] == [
            (OrderStatus.DRAFT, T0),
            (None, gone),
        ]
        assert count(session, Wallet) == 3


def test_order_seen_again_after_removal_is_live(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """An order found again after a 404 loses ``removed_at`` and its history says so."""
    draft = parse(wire_order("Draft", minted=True))
    with sessions.begin() as session:
        upsert_order(session, connection_id, draft, source=ChangeSource.FETCH, observed_at=T0)
        mark_removed(session, connection_id, ORDER_ID, T0, ChangeSource.FETCH)
        order = upsert_order(
            session,
            connection_id,
            draft,
            source=ChangeSource.FEED,
            observed_at=T0 + dt.timedelta(minutes=1),
        )

        assert order.removed_at is None
        statuses = session.scalars(sa.select(StatusChange.status).order_by(StatusChange.id))
        assert list(statuses) == [OrderStatus.DRAFT, None, OrderStatus.DRAFT]


def test_orders_of_unconfigured_partners_are_erased_and_noted_by_id(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Mirrored orders of a partner not configured go, with their customers; ids stay.

    The venue notifies and answers getOrder company-wide (CMOrderWebhooks;
    ChannelMgrOrderAgent ``GetOrder``), so such orders may have been mirrored before.
    """
    ours = Order.model_validate(wire_order("Issued", minted=True))
    theirs = Order.model_validate(
        {
            **wire_order("Issued", minted=True),
            "orderId": FOREIGN_ORDER_ID,
            "partnerId": FOREIGN_PARTNER,
        }
    )
    with sessions.begin() as session:
        for order in (ours, theirs):
            upsert_order(session, connection_id, order, source=ChangeSource.FETCH, observed_at=T0)

    with sessions.begin() as session:
        assert forget_foreign_orders(session, connection_id, [], T0) == 0
        erased = forget_foreign_orders(session, connection_id, [PARTNER_ID], T0)
    with sessions.begin() as session:
        again = forget_foreign_orders(session, connection_id, [PARTNER_ID], T0)

    assert (erased, again) == (1, 0)
    with sessions.begin() as session:
        assert list(session.scalars(sa.select(VenueOrder.order_id))) == [ORDER_ID]
        kept_rows = {
            model.__name__: session.scalar(sa.select(sa.func.count()).select_from(model))
            for model in (OrderItem, Wallet, Asset, StatusChange)
        }
        noted = session.execute(
            sa.select(ForeignOrder.order_id, ForeignOrder.partner_id, ForeignOrder.noted_at)
        ).one()
        names = session.scalars(sa.select(Wallet.name)).all()
        known = foreign_order_ids(
            session, connection_id, [FOREIGN_ORDER_ID.upper(), ORDER_ID], [PARTNER_ID]
        )
        welcome_back = foreign_order_ids(
            session, connection_id, [FOREIGN_ORDER_ID], [PARTNER_ID, FOREIGN_PARTNER]
        )
    mirrored_alone = upsert_counts(ours)
    assert kept_rows == mirrored_alone
    assert tuple(noted) == (FOREIGN_ORDER_ID, FOREIGN_PARTNER, T0)
    assert len(names) == mirrored_alone["Wallet"]
    assert known == {FOREIGN_ORDER_ID}
    assert welcome_back == set()


def test_erasing_a_partners_orders_drops_its_feed_cursor_so_they_come_back_whole(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A partner dropped from the settings (a mistyped id, say) loses its feed cursor and
    marks with its orders; configured again, its change feed is read from the start
    (APIRequest GetRecords without lastRowVersion) and its orders are mirrored anew."""
    with sessions.begin() as session:
        for partner in (PARTNER_ID, FOREIGN_PARTNER):
            session.add(
                FeedCursor(
                    connection_id=connection_id,
                    partner_id=partner,
                    last_row_version=1_000_000_000_123,
                    updated_at=T0,
                )
            )
            session.add(
                FeedMark(
                    connection_id=connection_id,
                    partner_id=partner,
                    row_version=1_000_000_000_123,
                    recorded_at=T0,
                )
            )

    with sessions.begin() as session:
        forget_foreign_orders(session, connection_id, [PARTNER_ID], T0)

    with sessions.begin() as session:
        cursors = session.scalars(sa.select(FeedCursor.partner_id)).all()
        marks = session.scalars(sa.select(FeedMark.partner_id)).all()
    assert (cursors, marks) == ([PARTNER_ID], [PARTNER_ID])
