"""Customers' names and e-mails are erased after their visit: what that needs stored.

``venue_order`` and ``ledger_line`` gain ``last_visit_date`` (the latest visit date of
the order's lines, of the sale's request) and ``personal_data_erased_at``, with a
partial index of the rows not erased yet, by visit date: the scheduled erasure
(:mod:`heartbeat.privacy`) reads only those whose visit is past, so its cost follows
what became due, not the history. The visit dates of the rows already stored are
filled here. ``outbox`` is indexed by
``order_id`` (the calls on an order are erased with it), and ``privacy_erasure`` records
each erasure. The downgrade drops all of it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.refill import id_ranges
from storage.types import UTCDateTime
from storage.visits import request_visit_date

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("venue_order", "ledger_line")
# The indexes hold only the rows not erased yet (storage.models._not_erased_index).
_NOT_ERASED = sa.text("personal_data_erased_at IS NULL")


def upgrade() -> None:
    """Add the columns, indexes and table; fill the visit dates of the rows stored."""
    for table in _TABLES:
        op.add_column(table, sa.Column("last_visit_date", sa.Date(), nullable=True))
        op.add_column(table, sa.Column("personal_data_erased_at", UTCDateTime(), nullable=True))
        op.create_index(
            op.f(f"ix_{table}_last_visit_date"),
            table,
            ["last_visit_date"],
            postgresql_where=_NOT_ERASED,
            sqlite_where=_NOT_ERASED,
        )
    op.create_index(op.f("ix_outbox_order_id"), "outbox", ["order_id"])
    op.create_table(
        "privacy_erasure",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "retention",
                "email",
                "reference",
                name="kind",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("selector", sa.String(100), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_erasure")),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["venue_connection.id"],
            name=op.f("fk_privacy_erasure_connection_id_venue_connection"),
        ),
    )
    op.create_index(op.f("ix_privacy_erasure_at"), "privacy_erasure", ["at"])
    _fill_visit_dates(op.get_bind())


def _fill_visit_dates(bind: sa.Connection) -> None:
    orders = sa.table("venue_order", sa.column("id"), sa.column("last_visit_date", sa.Date))
    items = sa.table("order_item", sa.column("venue_order_id"), sa.column("visit_date", sa.Date))
    latest = (
        sa.select(sa.func.max(items.c.visit_date))
        .where(items.c.venue_order_id == orders.c.id)
        .scalar_subquery()
    )
    op.execute(sa.update(orders).values(last_visit_date=latest))
    # A sale's visit dates are inside its request (JSON): read with the function the
    # application keeps the column with.
    ledger = sa.table(
        "ledger_line",
        sa.column("id"),
        sa.column("request", sa.JSON),
        sa.column("last_visit_date", sa.Date),
    )
    set_date = (
        sa.update(ledger)
        .where(ledger.c.id == sa.bindparam("line_id"))
        .values(last_visit_date=sa.bindparam("visit"))
    )
    for first, last in id_ranges(bind, "ledger_line"):
        rows = bind.execute(
            sa.select(ledger.c.id, ledger.c.request).where(
                ledger.c.id.between(first, last), ledger.c.request.is_not(None)
            )
        ).all()
        updates = [
            {"line_id": row.id, "visit": visit}
            for row in rows
            if (visit := request_visit_date(row.request)) is not None
        ]
        if updates:
            bind.execute(set_date, updates)


def downgrade() -> None:
    """Drop ``privacy_erasure``, the outbox's index by order and the columns."""
    op.drop_index(op.f("ix_privacy_erasure_at"), table_name="privacy_erasure")
    op.drop_table("privacy_erasure")
    op.drop_index(op.f("ix_outbox_order_id"), table_name="outbox")
    for table in _TABLES:
        op.drop_index(op.f(f"ix_{table}_last_visit_date"), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("personal_data_erased_at")
            batch.drop_column("last_visit_date")
