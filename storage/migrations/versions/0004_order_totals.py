"""Orders keep their totals; ledger lines keep their external references as one key.

A reconciliation compares each sale with its order's quantity, price, currencies and
external reference numbers. Computed on every run, that meant joining and grouping every
item and wallet of the period; kept on the order (set whenever its items are written,
see ``VenueOrder.summarize_items``) it is one row per order:

- ``venue_order.items_quantity``, ``amount_incl_vat``, ``amount_excl_vat``
  (micro-units; a group ticket's one wallet counts for its whole quantity),
  ``wallet_currencies`` (``"EUR"``, or ``"EUR/GBP"`` when they differ) and
  ``wallet_external_references`` (``venue.models.reference_set_key``);
- ``ledger_line.external_references_key``: the listed numbers, in the same form.

Existing rows are filled in by the same functions that keep them
(``storage.models.order_totals``, ``reference_set_key``), a thousand orders at a time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

import sqlalchemy as sa
from alembic import op

from storage.models import order_totals
from storage.types import from_micros, to_micros
from venue.models import reference_set_key

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ORDER_COLUMNS = (
    ("items_quantity", sa.BigInteger()),
    ("amount_incl_vat", sa.BigInteger()),
    ("amount_excl_vat", sa.BigInteger()),
    ("wallet_currencies", sa.Text()),
    ("wallet_external_references", sa.Text()),
)
_BATCH = 1000


def upgrade() -> None:
    """Add the columns and fill them for the rows already there."""
    for name, type_ in _ORDER_COLUMNS:
        op.add_column("venue_order", sa.Column(name, type_, nullable=True))
    op.add_column("ledger_line", sa.Column("external_references_key", sa.Text(), nullable=True))
    bind = op.get_bind()
    orders = sa.table("venue_order", sa.column("id"), *(sa.column(n) for n, _ in _ORDER_COLUMNS))
    set_totals = (
        sa.update(orders)
        .where(orders.c.id == sa.bindparam("order_pk"))
        .values({name: sa.bindparam(name) for name, _ in _ORDER_COLUMNS})
    )
    for first, last in _id_ranges(bind, "venue_order"):
        if updates := _order_totals(bind, first, last):
            bind.execute(set_totals, updates)
    set_key = sa.text("UPDATE ledger_line SET external_references_key = :key WHERE id = :id")
    ledger = sa.table(
        "ledger_line", sa.column("id"), sa.column("external_reference_numbers", sa.JSON)
    )
    for first, last in _id_ranges(bind, "ledger_line"):
        lines = bind.execute(
            sa.select(ledger.c.id, ledger.c.external_reference_numbers).where(
                ledger.c.id.between(first, last),
                ledger.c.external_reference_numbers.is_not(None),
            )
        ).all()
        updates = [
            {"id": line_id, "key": reference_set_key(numbers if isinstance(numbers, list) else ())}
            for line_id, numbers in lines
        ]
        if updates:
            bind.execute(set_key, updates)


def _id_ranges(bind: sa.Connection, table: str) -> Iterator[tuple[int, int]]:
    """The table's ids in ranges of about a thousand rows, first to last."""
    after = 0
    while True:
        ids = (
            bind.execute(
                sa.select(sa.column("id", sa.BigInteger))
                .select_from(sa.table(table))
                .where(sa.column("id", sa.BigInteger) > after)
                .order_by(sa.column("id", sa.BigInteger))
                .limit(_BATCH)
            )
            .scalars()
            .all()
        )
        if not ids:
            return
        yield ids[0], ids[-1]
        after = ids[-1]


# Named tuples, not dataclasses: alembic loads this file without registering it as a
# module, which dataclasses need.
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
            "WHERE venue_order_id BETWEEN :first AND :last"
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
            "WHERE i.venue_order_id BETWEEN :first AND :last"
        ),
        {"first": first, "last": last},
    ):
        items[item_id].wallets.append(_Wallet(_amount(incl), _amount(excl), currency, external))
    updates = []
    for order_id, order_items in orders.items():
        totals = order_totals(order_items)
        row = {name: getattr(totals, name) for name, _ in _ORDER_COLUMNS}
        for name in ("amount_incl_vat", "amount_excl_vat"):
            row[name] = None if row[name] is None else to_micros(row[name])
        updates.append({"order_pk": order_id, **row})
    return updates


def _amount(micros: int | None) -> Decimal | None:
    return None if micros is None else from_micros(micros)


def downgrade() -> None:
    """Drop the columns (their values are derived: nothing is lost)."""
    with op.batch_alter_table("ledger_line") as batch:
        batch.drop_column("external_references_key")
    with op.batch_alter_table("venue_order") as batch:
        for name, _ in reversed(_ORDER_COLUMNS):
            batch.drop_column(name)
