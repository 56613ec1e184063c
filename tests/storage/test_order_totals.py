"""Orders keep their totals, and sales their external references, in step with what they hold.

A reconciliation reads these columns instead of every item and wallet, so they must be
right whoever writes the order: the mirror's upsert, an ORM change to one wallet, or the
migration that filled them for orders stored before they existed.
"""

from __future__ import annotations

import copy
import dataclasses
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from storage import migrate
from storage.engine import make_sessions
from storage.models import ChangeSource, LedgerLine, VenueOrder
from storage.totals import order_totals
from tests.storage.test_models import T0, connection_id, ledger_line, parse, wire_order
from venue.values import reference_set_key

__all__ = ["connection_id"]  # the fixture, used by name


@dataclasses.dataclass
class _Wallet:
    """A wallet as order_totals reads it."""

    excl: str | None
    incl: str | None
    currency_code: str | None = "DKK"
    external_reference_number: str | None = None

    @property
    def unit_price_excl_vat(self) -> Decimal | None:
        return None if self.excl is None else Decimal(self.excl)

    @property
    def unit_price_incl_vat(self) -> Decimal | None:
        return None if self.incl is None else Decimal(self.incl)


@dataclasses.dataclass
class _Item:
    """An item as order_totals reads it."""

    quantity: int
    wallets: list[_Wallet]


def totals(order: VenueOrder) -> tuple[Any, ...]:
    return (
        order.items_quantity,
        order.amount_incl_vat,
        order.amount_excl_vat,
        order.wallet_currencies,
        order.wallet_external_references,
    )


def upsert(sessions: sessionmaker[Session], connection_id: int, raw: dict[str, Any]) -> int:
    with sessions.begin() as session:
        return upsert_order(
            session, connection_id, parse(raw), source=ChangeSource.POLL, observed_at=T0
        ).id


def test_reference_set_key_is_the_set_in_the_venues_form() -> None:
    """Order, case, blanks and repeats do not matter; nothing listed is None."""
    assert reference_set_key([" b-2", "A-1", "a-1 ", "", None]) == "A-1\nB-2"
    assert reference_set_key(["A-1", "B-2"]) == reference_set_key(["b-2", "a-1"])
    assert reference_set_key(["A-1"]) != reference_set_key(["A-1", "B-2"])
    assert reference_set_key([]) is None
    assert reference_set_key(["  "]) is None


def test_an_upserted_order_keeps_its_totals(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Quantities and prices added up, currencies and external references as one key."""
    order_pk = upsert(sessions, connection_id, wire_order("Issued"))
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert totals(order) == (
            3,
            Decimal("666.666666"),  # 125 + 125 + 416.666666 (333.333333 x 1.25, rounded)
            Decimal("533.333333"),
            "DKK",
            "EXT-1\nEXT-2\nEXT-3",
        )


def test_replaced_items_replace_the_totals_and_a_header_change_keeps_them(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """New items give new totals; a status change alone leaves them as they were."""
    upsert(sessions, connection_id, wire_order("Issued"))
    changed = copy.deepcopy(wire_order("Issued"))
    changed["items"] = changed["items"][:1]
    first, second = changed["items"][0]["wallets"]
    second["currencyCode"] = "eur"
    second["unitPriceInclVat"] = None
    second["externalReferenceNumber"] = " ext-9 "
    order_pk = upsert(sessions, connection_id, changed)
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        expected = (
            2,
            Decimal(first["unitPriceInclVat"]),
            Decimal("200.00"),
            "DKK/EUR",
            "EXT-1\nEXT-9",
        )
        assert totals(order) == expected

    cancelled = copy.deepcopy(changed)
    cancelled["status"] = "Cancelled"
    upsert(sessions, connection_id, cancelled)
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert order.status == "Cancelled"
        assert totals(order) == expected


def test_a_group_tickets_one_wallet_carries_the_whole_groups_price(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """CMTicketIssuer AccumulatePriceOnWallet: a group ticket's one wallet carries the
    per-person price times the quantity, so the order comes to what the wallet carries."""
    raw = wire_order("Issued")
    group = raw["items"][0]
    group["quantity"] = 4
    group["wallets"] = group["wallets"][:1]
    group["wallets"][0]["unitPriceExclVat"] = "400.00"  # 4 guests at 100.00
    group["wallets"][0]["unitPriceInclVat"] = "500.00"
    order_pk = upsert(sessions, connection_id, raw)
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert order.items_quantity == 5
        assert order.amount_excl_vat == Decimal("400.00") + Decimal("333.333333")
        assert order.amount_incl_vat == Decimal("500.00") + Decimal("416.666666")


def test_amounts_add_up_what_the_wallets_carry_whatever_the_quantity() -> None:
    """CMTicketIssuer AccumulatePriceOnWallet / CMCouponIssuer IssueAndAttachForAddOnLine:
    each wallet carries its own price (a ticket's unit price, a group's whole price, a
    package's components and coupons), so the amounts are the wallets' prices added up,
    never scaled by quantity / wallets; unpriced wallets add nothing."""
    single = _Item(2, [_Wallet("80.00", "100.00"), _Wallet("80.00", "100.00")])
    group = _Item(6, [_Wallet("360.00", "450.00")])
    package = _Item(1, [_Wallet("128.00", "160.00")])
    partly = _Item(3, [_Wallet("10.00", None), _Wallet(None, None), _Wallet("10.00", None)])
    totals = order_totals([single, group, package, partly])
    assert totals.items_quantity == 12
    assert totals.amount_excl_vat == Decimal("668.00")
    assert totals.amount_incl_vat == Decimal("810.00")
    assert order_totals([_Item(5, [_Wallet(None, None)])]).amount_incl_vat is None


def test_an_order_without_items_or_prices_has_no_totals(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Nothing to add up is None, not zero: the reconciliation then skips the check."""
    raw = wire_order("Submitted")
    raw["items"] = []
    order_pk = upsert(sessions, connection_id, raw)
    with sessions() as session:
        assert totals(session.get_one(VenueOrder, order_pk)) == (None,) * 5


def test_a_wallet_changed_in_place_updates_its_orders_totals(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Writes through the ORM below the order (an item's quantity, a wallet's price) count too."""
    order_pk = upsert(sessions, connection_id, wire_order("Issued"))
    with sessions.begin() as session:
        order = session.get_one(VenueOrder, order_pk)
        order.items[0].quantity = 4  # counted; the amounts are what the wallets carry
        order.items[1].wallets[0].unit_price_excl_vat = Decimal("1.00")
        order.items[1].wallets[0].external_reference_number = "NEW"
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert order.items_quantity == 5
        assert order.amount_excl_vat == Decimal("201.00")
        assert order.wallet_external_references == "EXT-1\nEXT-2\nNEW"


def test_the_totals_are_kept_by_otacms_session_factory_not_globally(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """The hooks belong to make_sessions' factory: a bare SQLAlchemy session on the same
    database writes a wallet as told and leaves the order's totals alone (importing the
    models registered nothing on SQLAlchemy's Session class); the factory's next session
    keeps them again."""
    order_pk = upsert(sessions, connection_id, wire_order("Issued"))
    with Session(bind=sessions.kw["bind"]) as bare, bare.begin():
        order = bare.get_one(VenueOrder, order_pk)
        before = totals(order)
        order.items[1].wallets[0].unit_price_excl_vat = Decimal("1.00")
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert order.items[1].wallets[0].unit_price_excl_vat == Decimal("1.00")
        assert totals(order) == before
    with sessions.begin() as session:
        session.get_one(VenueOrder, order_pk).items[0].quantity = 4
    with sessions() as session:
        order = session.get_one(VenueOrder, order_pk)
        assert (order.items_quantity, order.amount_excl_vat) == (5, Decimal("201.00"))


def test_a_sale_keeps_its_listed_references_as_one_key(
    sessions: sessionmaker[Session], connection_id: int
) -> None:
    """Set with the list, cleared with it."""
    with sessions.begin() as session:
        line = ledger_line(connection_id, "S-1", external_reference_numbers=["x-2", "X-1"])
        session.add(line)
        session.flush()
        assert line.external_references_key == "X-1\nX-2"
        line.external_reference_numbers = None
        session.flush()
        assert line.external_references_key is None


def test_0004_fills_the_totals_of_orders_stored_before_it(engine: sa.Engine) -> None:
    """Upgrading from 0003 computes every order's totals and every sale's key once."""
    migrate.upgrade(engine, "0003")
    at = "2026-05-27 12:00:00+00:00"
    statements = [
        "INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)",
        "INSERT INTO venue_order (id, connection_id, order_id, partner_id,"
        " sell_to_order_reference, reference_key, status, status_changed_at, first_seen_at,"
        " updated_at) VALUES (1, 1, 'o-1', 'p', 'S-1', 'S-1', 'Issued', :at, :at, :at),"
        " (2, 1, 'o-2', 'p', 'S-2', 'S-2', 'Submitted', :at, :at, :at)",
        "INSERT INTO order_item (id, venue_order_id, line_no, item_number, is_package, quantity)"
        " VALUES (1, 1, 1, 'ADULT', false, 2), (2, 1, 2, 'CHILD', false, 1)",
        "INSERT INTO wallet (id, order_item_id, seq_no, external_reference_number,"
        " unit_price_excl_vat, unit_price_incl_vat, currency_code) VALUES"
        " (1, 1, 1, 'e-2', 8000000, 10000000, 'eur'), (2, 1, 2, 'E-1', 8000000, NULL, 'EUR'),"
        " (3, 2, 1, NULL, 4000000, 5000000, 'DKK')",
        "INSERT INTO ledger_line (id, connection_id, partner_id, shop_reference, reference_key,"
        " sold_at, quantity, amount, currency, amount_includes_vat, external_reference_numbers,"
        " state, source, created_at, updated_at) VALUES (1, 1, 'p', 'S-1', 'S-1', :at, 3, 15,"
        " 'EUR', true, '[\"e-1\", \" E-2\"]', 'active', 'import', :at, :at),"
        " (2, 1, 'p', 'S-2', 'S-2', :at, 1, 0, 'EUR', true, NULL, 'active', 'import', :at, :at)",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement), {"at": at})

    migrate.upgrade(engine)

    with make_sessions(engine)() as session:
        orders = {order.id: totals(order) for order in session.scalars(sa.select(VenueOrder))}
        keys = {
            line_id: key
            for line_id, key in session.execute(
                sa.select(LedgerLine.id, LedgerLine.external_references_key)
            )
        }
    assert orders == {
        1: (3, Decimal("15.00"), Decimal("20.00"), "DKK/EUR", "E-1\nE-2"),
        2: (None, None, None, None, None),
    }
    assert keys == {1: "E-1\nE-2", 2: None}


def test_0004_downgrades_to_the_columns_before_it(migrated_engine: sa.Engine) -> None:
    """The columns are derived: dropping them loses nothing that cannot be computed again."""
    with migrated_engine.begin() as connection:
        command.downgrade(migrate.alembic_config(connection), "0003")
    inspector = sa.inspect(migrated_engine)
    assert not {"items_quantity", "wallet_currencies"} & {
        column["name"] for column in inspector.get_columns("venue_order")
    }
    assert "external_references_key" not in {
        column["name"] for column in inspector.get_columns("ledger_line")
    }


def test_0009_recomputes_stored_totals_as_the_wallets_carry_them(engine: sa.Engine) -> None:
    """CMTicketIssuer AccumulatePriceOnWallet: totals kept before 0009 scaled a group
    ticket's one wallet by its quantity; upgrading recomputes every order's totals from
    what its wallets carry, and leaves orders without items alone."""
    migrate.upgrade(engine, "0008")
    at = "2026-05-27 12:00:00+00:00"
    statements = [
        "INSERT INTO venue_connection (id, name, created_at) VALUES (1, 'v', :at)",
        # Order 1's totals as the scaling kept them: 6 x 450.00 for the group's wallet.
        "INSERT INTO venue_order (id, connection_id, order_id, partner_id,"
        " sell_to_order_reference, reference_key, status, status_changed_at, first_seen_at,"
        " updated_at, items_quantity, amount_incl_vat, amount_excl_vat, wallet_currencies,"
        " wallet_external_references) VALUES"
        " (1, 1, 'o-1', 'p', 'S-1', 'S-1', 'Issued', :at, :at, :at, 8, 2900000000,"
        " 2320000000, 'DKK', 'G-1\nT-1\nT-2'),"
        " (2, 1, 'o-2', 'p', 'S-2', 'S-2', 'Submitted', :at, :at, :at,"
        " NULL, NULL, NULL, NULL, NULL)",
        "INSERT INTO order_item (id, venue_order_id, line_no, item_number, is_package, quantity)"
        " VALUES (1, 1, 1, '31050', false, 6), (2, 1, 2, '31001', false, 2)",
        "INSERT INTO wallet (id, order_item_id, seq_no, external_reference_number,"
        " unit_price_excl_vat, unit_price_incl_vat, currency_code) VALUES"
        " (1, 1, 1, 'G-1', 360000000, 450000000, 'DKK'),"
        " (2, 2, 1, 'T-1', 80000000, 100000000, 'DKK'),"
        " (3, 2, 2, 'T-2', 80000000, 100000000, 'DKK')",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement), {"at": at})

    migrate.upgrade(engine)

    with make_sessions(engine)() as session:
        orders = {order.id: totals(order) for order in session.scalars(sa.select(VenueOrder))}
    assert orders == {
        1: (8, Decimal("650.00"), Decimal("520.00"), "DKK", "G-1\nT-1\nT-2"),
        2: (None, None, None, None, None),
    }
