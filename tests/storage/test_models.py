"""The schema's rules and shared writes: nothing doubled, orders mirrored as the venue says."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from storage.flush import ColumnOverflow
from storage.models import (
    Asset,
    ChangeSource,
    Inbox,
    InboxSource,
    LedgerLine,
    LedgerSource,
    OrderItem,
    StatusChange,
    VenueOrder,
    Wallet,
    canonical_payload,
    ensure_connection,
    inbox_dedup_key,
)
from venue.models import Order, OrderStatus

ORDER_ID = "5f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
PARTNER_ID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
T0 = dt.datetime(2026, 5, 15, 9, 30, tzinfo=dt.UTC)
ZERO_GUID = "00000000-0000-0000-0000-000000000000"


def wire_order(status: str = "Submitted", *, minted: bool = False) -> dict[str, Any]:
    """A getOrder answer: two lines, a package with two wallets; minted wallets have assets."""

    def wallet(seq: int, external: str, price: str) -> dict[str, Any]:
        number = f"WR-{seq:04d}-{external}" if minted else ""
        return {
            "seqNo": seq,
            "walletId": f"9d8c7b6a-0000-4000-8000-00000000000{seq}" if minted else ZERO_GUID,
            "walletReferenceNumber": number,
            "externalReferenceNumber": external,
            "name": f"Visitor {seq}",
            "issuedAt": "2026-05-15T09:31:02Z" if minted else "",
            "unitPriceExclVat": price,
            "unitPriceInclVat": str(Decimal(price) * Decimal("1.25")),
            "currencyCode": "DKK",
            "manifestUrl": f"https://manifest.example/w/{seq}" if minted else "",
            "assets": (
                [
                    {
                        "id": f"asset-row-{seq}-1",
                        "type": "ticket",
                        "assetId": f"TK-{seq}-1",
                        "referenceNumber": f"REF{seq}01",
                        "itemNumber": "ADULT",
                        "description": "Adult admission",
                    },
                    {
                        "id": f"asset-row-{seq}-2",
                        "type": "coupon",
                        "assetId": f"CP-{seq}-2",
                        "referenceNumber": f"REF{seq}02",
                        "itemNumber": "CAFE",
                        "description": "Café voucher",
                    },
                ]
                if minted
                else []
            ),
        }

    return {
        "orderId": ORDER_ID,
        "status": status,
        "statusMessage": "",
        "partnerId": PARTNER_ID,
        "sellToOrderReference": "SHOP-1001",
        "buyFromOrderReference": "CM-20260515093000-A1B2",
        "receivedAt": "2026-05-15T09:30:00Z",
        "sellToEmail": "buyer@example.com",
        "sellToName": "A. Buyer",
        "sellToLanguage": "ENU",
        "paymentReference": "PAY-77",
        "jobId": "",
        "manifestUrl": "https://manifest.example/o/1" if minted else "",
        "items": [
            {
                "lineNo": 100000,
                "itemNumber": "ADULT",
                "description": "Adult admission",
                "isPackage": False,
                "quantity": 2,
                "visitDate": "2026-06-01",
                "visitTime": "10:00:00",
                "wallets": [wallet(1, "EXT-1", "100.00"), wallet(2, "EXT-2", "100.00")],
            },
            {
                "lineNo": 200000,
                "itemNumber": "FAMILY",
                "description": "Family package",
                "isPackage": True,
                "quantity": 1,
                "visitDate": "2026-06-01",
                "visitTime": "",
                "wallets": [wallet(3, "EXT-3", "333.333333")],
            },
        ],
    }


def with_change(raw: dict[str, Any], change: tuple[Any, ...]) -> dict[str, Any]:
    """``raw`` with the field at ``change``'s path (keys and indexes) set to its last item."""
    *path, field, value = change
    target: Any = raw
    for step in path:
        target = target[step]
    target[field] = value
    return raw


def parse(raw: dict[str, Any]) -> Order:
    """The wire dict as the client would hand it over."""
    return Order.model_validate(raw)


@pytest.fixture
def connection_id(sessions: sessionmaker[Session]) -> int:
    """The id of the venue connection ``default``."""
    with sessions.begin() as session:
        return ensure_connection(session, "default")


def count(session: Session, model: type[Any]) -> int:
    """How many rows ``model``'s table has."""
    return session.execute(sa.select(sa.func.count()).select_from(model)).scalar_one()


def ledger_line(connection_id: int, reference: str, **overrides: Any) -> LedgerLine:
    """A sale as the shop's import would record it."""
    values: dict[str, Any] = {
        "connection_id": connection_id,
        "partner_id": PARTNER_ID,
        "shop_reference": reference,
        "sold_at": T0,
        "quantity": 2,
        "amount": Decimal("250.00"),
        "currency": "DKK",
        "source": LedgerSource.IMPORT,
    }
    return LedgerLine(**(values | overrides))


def inbox_row(connection_id: int, notification: dict[str, Any]) -> Inbox:
    """A webhook notification as the receiver would store it."""
    payload = {key: value for key, value in notification.items() if key != "clientState"}
    return Inbox(
        connection_id=connection_id,
        source=InboxSource.WEBHOOK,
        event_name=notification["eventName"],
        order_id=notification["payload"]["orderId"],
        received_at=T0,
        next_attempt_at=T0,
        payload=payload,
        dedup_key=inbox_dedup_key(canonical_payload(notification)),
    )


NOTIFICATION = {
    "appId": "992c2309-cca4-43cb-9e41-911f482ec088",
    "clientState": "first-secret",
    "eventName": "ota_cm_order_processed",
    "eventVersion": "1.0",
    "timestamp": "2026-05-15T09:31:05Z",
    "companyName": "CRONUS International Ltd.",
    "payload": {"orderId": ORDER_ID, "buyFromOrderReference": "CM-1", "status": "Issued"},
}


# --- connections and "nothing doubled" ---------------------------------------------------


def test_ensure_connection_is_idempotent(sessions: sessionmaker[Session]) -> None:
    """The same name gives the same id every time; another name gets its own row."""
    with sessions.begin() as session:
        first = ensure_connection(session, "default")
    with sessions.begin() as session:
        again = ensure_connection(session, "default")
        other = ensure_connection(session, "museum")

    assert again == first
    assert other != first


def test_ledger_reference_is_unique_case_insensitively(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """A second sale with the same reference in another case is refused."""
    with sessions.begin() as session:
        session.add(ledger_line(connection_id, "abc-1"))

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(ledger_line(connection_id, " ABC-1 "))

    with sessions.begin() as session:
        stored = session.scalars(sa.select(LedgerLine)).one()
        session.add(ledger_line(connection_id, "ABC-1", partner_id="another-partner"))
    assert (stored.shop_reference, stored.reference_key) == ("abc-1", "ABC-1")
    assert stored.amount == Decimal("250.00")
    assert stored.sold_at == T0


def test_inbox_stores_an_exact_repeat_once(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The same notification again (even under a rotated clientState) hits the unique key."""
    with sessions.begin() as session:
        session.add(inbox_row(connection_id, NOTIFICATION))

    repeat = copy.deepcopy(NOTIFICATION) | {"clientState": "rotated-secret"}
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(inbox_row(connection_id, repeat))

    later = copy.deepcopy(NOTIFICATION) | {"timestamp": "2026-05-15T09:45:00Z"}
    with sessions.begin() as session:
        session.add(inbox_row(connection_id, later))
        assert count(session, Inbox) == 2
        assert "clientState" not in session.scalars(sa.select(Inbox.payload)).first()


def _key(notification: dict[str, Any]) -> str:
    return inbox_dedup_key(canonical_payload(notification), notification.get("timestamp"))


def test_inbox_dedup_key_ignores_key_order_and_client_state() -> None:
    """Equal notifications give equal keys; any other difference gives another key."""
    reordered = dict(reversed(list(NOTIFICATION.items()))) | {"clientState": "x"}

    assert canonical_payload(reordered) == canonical_payload(NOTIFICATION)
    assert "clientState" not in canonical_payload(reordered)
    assert _key(reordered) == _key(NOTIFICATION)
    assert _key(NOTIFICATION | {"eventVersion": "1.1"}) != _key(NOTIFICATION)
    later = NOTIFICATION | {"timestamp": "2026-05-15T09:31:06Z"}
    assert _key(later) != _key(NOTIFICATION)


def test_inbox_dedup_keys_lead_with_the_notifications_time() -> None:
    """Keys sort by the notification's time, then its hash; without a time, the hash alone."""
    payload = canonical_payload(NOTIFICATION)
    digest = hashlib.sha256(payload.encode()).hexdigest()

    assert _key(NOTIFICATION) == ("20260515093105" + digest)[:64]
    assert inbox_dedup_key(payload) == digest
    assert inbox_dedup_key(payload, 1747301465) == digest  # not the venue's text: no lead
    # Only ASCII digits lead, at most twenty; the key is always 64 characters.
    odd = inbox_dedup_key(payload, "２０٣ 2026-05-15T09:31:05.123456789+02:00")
    assert odd == ("20260515093105123456" + digest)[:64]
    stamps = ["2026-05-15T09:31:05.001Z", "2026-05-15T09:31:05.002Z", "2026-05-15T10:00:00.000Z"]
    keys = [_key(NOTIFICATION | {"timestamp": stamp}) for stamp in stamps]
    assert keys == sorted(keys)
    assert {len(key) for key in keys} == {64}


def test_order_id_is_unique_per_connection(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Two rows for one venue orderId are refused; another connection may have it."""

    def order_row(connection: int) -> VenueOrder:
        return VenueOrder(
            connection_id=connection,
            order_id=ORDER_ID,
            partner_id=PARTNER_ID,
            sell_to_order_reference="SHOP-1001",
            status=OrderStatus.SUBMITTED,
            status_changed_at=T0,
            first_seen_at=T0,
        )

    with sessions.begin() as session:
        session.add(order_row(connection_id))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(order_row(connection_id))
    with sessions.begin() as session:
        session.add(order_row(ensure_connection(session, "museum")))


def test_check_constraint_refuses_unknown_state(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The database itself refuses a state outside the enum, whatever wrote it."""
    with sessions.begin() as session:
        session.add(inbox_row(connection_id, NOTIFICATION))

    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.execute(sa.update(Inbox).values(state=sa.literal_column("'bogus'")))


# --- the order mirror --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("items", 0, "wallets", 0, "currencyCode", "C" * 11),
            "wallet.currency_code: longer than 10",
        ),
        (("items", 0, "quantity", 2**31), "order_item.quantity: outside a 32-bit integer"),
        (("items", 0, "wallets", 0, "unitPriceExclVat", "1e13"), "price_excl_vat: out of range"),
    ],
    ids=["text-too-wide", "integer-out-of-range", "money-out-of-range"],
)
def test_a_value_no_column_holds_is_refused_the_same_on_both_databases(
    sessions: sessionmaker[Session],
    connection_id: int,
    change: tuple[Any, ...],
    message: str,
) -> None:
    """PostgreSQL would refuse it and SQLite keep it: refused before either sees it."""
    raw = with_change(wire_order("Issued", minted=True), change)

    with pytest.raises(ColumnOverflow, match=message), sessions.begin() as session:
        upsert_order(session, connection_id, parse(raw), source=ChangeSource.POLL, observed_at=T0)

    with sessions.begin() as session:
        assert (count(session, VenueOrder), count(session, Wallet)) == (0, 0)


@pytest.mark.parametrize(
    "change",
    [
        ("buyFromOrderReference", "C" * 50),
        ("items", 0, "quantity", 2**31 - 1),
        # A company's own currency code: Business Central's Currency.Code is a Code[10]
        # (CMOrderWallet CurrencyCode).
        ("items", 0, "wallets", 0, "currencyCode", "LOCALCUR10"),
        # The order's total (this wallet's price and two more) must fit too.
        ("items", 0, "wallets", 0, "unitPriceExclVat", Decimal("9223372036000")),
    ],
    ids=["text", "integer", "currency", "money"],
)
def test_values_at_their_columns_limits_are_stored(
    sessions: sessionmaker[Session], connection_id: int, change: tuple[Any, ...]
) -> None:
    """The limits are the columns' own: a value just inside one is stored whole."""
    raw = with_change(wire_order("Issued", minted=True), change)
    field, value = change[-2:]

    with sessions.begin() as session:
        upsert_order(session, connection_id, parse(raw), source=ChangeSource.POLL, observed_at=T0)

    with sessions.begin() as session:
        order = session.scalars(sa.select(VenueOrder)).one()
        stored = {
            "buyFromOrderReference": order.buy_from_order_reference,
            "quantity": order.items[0].quantity,
            "currencyCode": order.items[0].wallets[0].currency_code,
            "unitPriceExclVat": order.items[0].wallets[0].unit_price_excl_vat,
        }
        assert stored[field] == value


def test_deleting_an_order_cascades_to_its_lines(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Foreign keys are enforced with cascades on both databases (SQLite needs a pragma)."""
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            parse(wire_order("Issued", minted=True)),
            source=ChangeSource.WEBHOOK,
            observed_at=T0,
        )
    with sessions.begin() as session:
        session.execute(sa.delete(VenueOrder))

    with sessions.begin() as session:
        assert [count(session, model) for model in (OrderItem, Wallet, Asset, StatusChange)] == [
            0,
            0,
            0,
            0,
        ]
