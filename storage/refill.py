"""Filling derived order columns for rows already stored, a thousand orders at a time.

Migrations that add or change how ``venue_order``'s totals are derived
(``0004_order_totals``, ``0009_wallet_prices``) recompute them here with the very
function the application keeps them with (:func:`storage.totals.order_totals`), reading
items and wallets with plain SQL so that no ORM mapping newer than the migration is
involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any, NamedTuple

import sqlalchemy as sa

from storage.totals import order_totals
from storage.types import from_micros, to_micros

BATCH = 1000
"""Rows per batch: one batch's items and wallets are read in two queries."""

TOTAL_COLUMNS = (
    "items_quantity",
    "amount_incl_vat",
    "amount_excl_vat",
    "wallet_currencies",
    "wallet_external_references",
)
"""The ``venue_order`` columns that keep :class:`storage.totals.OrderTotals`."""


def id_ranges(bind: sa.Connection, table: str) -> Iterator[tuple[int, int]]:
    """The table's ids in ranges of about :data:`BATCH` rows, first to last."""
    after = 0
    while True:
        ids = (
            bind.execute(
                sa.select(sa.column("id", sa.BigInteger))
                .select_from(sa.table(table))
                .where(sa.column("id", sa.BigInteger) > after)
                .order_by(sa.column("id", sa.BigInteger))
                .limit(BATCH)
            )
            .scalars()
            .all()
        )
        if not ids:
            return
        yield ids[0], ids[-1]
        after = ids[-1]


def refill_order_totals(bind: sa.Connection) -> int:
    """Recompute every stored order's totals from its items and wallets.

    Orders without items keep what they have (their totals are all ``None`` already).

    Returns:
        How many orders were written.
    """
    orders = sa.table("venue_order", sa.column("id"), *(sa.column(n) for n in TOTAL_COLUMNS))
    set_totals = (
        sa.update(orders)
        .where(orders.c.id == sa.bindparam("order_pk"))
        .values({name: sa.bindparam(name) for name in TOTAL_COLUMNS})
    )
    written = 0
    for first, last in id_ranges(bind, "venue_order"):
        if updates := _order_totals(bind, first, last):
            bind.execute(set_totals, updates)
            written += len(updates)
    return written


class _Wallet(NamedTuple):
    unit_price_incl_vat: Decimal | None
    unit_price_excl_vat: Decimal | None
    currency_code: str | None
    external_reference_number: str | None


class _Item(NamedTuple):
    quantity: int
    wallets: list[_Wallet]


def _order_totals(bind: sa.Connection, first: int, last: int) -> list[dict[str, Any]]:
    """The totals of the orders ``first`` to ``last`` that have items, as update rows."""
    items: dict[int, _Item] = {}
    orders: dict[int, list[_Item]] = {}
    for item_id, order_id, quantity in bind.execute(
        sa.text(
            "SELECT id, venue_order_id, quantity FROM order_item "
            "WHERE venue_order_id BETWEEN :first AND :last ORDER BY id"
        ),
        {"first": first, "last": last},
    ):
        items[item_id] = _Item(quantity, [])
        orders.setdefault(order_id, []).append(items[item_id])
    for item_id, incl, excl, currency, external in bind.execute(
        sa.text(
            "SELECT w.order_item_id, w.unit_price_incl_vat, w.unit_price_excl_vat, "
            "w.currency_code, w.external_reference_number "
            "FROM wallet w JOIN order_item i ON i.id = w.order_item_id "
            "WHERE i.venue_order_id BETWEEN :first AND :last ORDER BY w.id"
        ),
        {"first": first, "last": last},
    ):
        items[item_id].wallets.append(_Wallet(_amount(incl), _amount(excl), currency, external))
    updates = []
    for order_id, order_items in orders.items():
        totals = order_totals(order_items)
        row = {name: getattr(totals, name) for name in TOTAL_COLUMNS}
        for name in ("amount_incl_vat", "amount_excl_vat"):
            row[name] = None if row[name] is None else to_micros(row[name])
        updates.append({"order_pk": order_id, **row})
    return updates


def _amount(micros: int | None) -> Decimal | None:
    return None if micros is None else from_micros(micros)
