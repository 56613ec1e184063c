"""Orders keep their totals; ledger lines keep their external references as one key.

A reconciliation compares each sale with its order's quantity, price, currencies and
external reference numbers. Computed on every run, that meant joining and grouping every
item and wallet of the period; kept on the order (set whenever its items are written,
see ``VenueOrder.summarize_items``) it is one row per order:

- ``venue_order.items_quantity``, ``amount_incl_vat``, ``amount_excl_vat``
  (micro-units; a group ticket's one wallet counts for its whole quantity),
  ``wallet_currencies`` (``"EUR"``, or ``"EUR/GBP"`` when they differ) and
  ``wallet_external_references`` (``venue.values.reference_set_key``);
- ``ledger_line.external_references_key``: the listed numbers, in the same form.

Existing rows are filled in by the same functions that keep them
(``storage.totals.order_totals`` through ``storage.refill``, ``reference_set_key``), a
thousand rows at a time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.refill import id_ranges, refill_order_totals
from venue.values import reference_set_key

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


def upgrade() -> None:
    """Add the columns and fill them for the rows already there."""
    for name, type_ in _ORDER_COLUMNS:
        op.add_column("venue_order", sa.Column(name, type_, nullable=True))
    op.add_column("ledger_line", sa.Column("external_references_key", sa.Text(), nullable=True))
    bind = op.get_bind()
    refill_order_totals(bind)
    set_key = sa.text("UPDATE ledger_line SET external_references_key = :key WHERE id = :id")
    ledger = sa.table(
        "ledger_line", sa.column("id"), sa.column("external_reference_numbers", sa.JSON)
    )
    for first, last in id_ranges(bind, "ledger_line"):
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


def downgrade() -> None:
    """Drop the columns (their values are derived: nothing is lost)."""
    with op.batch_alter_table("ledger_line") as batch:
        batch.drop_column("external_references_key")
    with op.batch_alter_table("venue_order") as batch:
        for name, _ in reversed(_ORDER_COLUMNS):
            batch.drop_column(name)
