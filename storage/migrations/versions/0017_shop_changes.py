"""The shop's change feed: each mirror order numbered by the commit that last changed it.

``venue_order`` gains ``change_seq`` (0 for the orders already stored: they come first in
the feed) and ``changed_at``, with an index on ``(change_seq, id)`` that the shop's
keyset paging reads; ``change_counter`` holds the counter that numbers the commits (its
row ``mirror`` is made by the first commit that needs it, so a new database stays
empty: ``otacm db restore`` takes a bare schema only). The downgrade drops them.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the columns, their index and the counter."""
    with op.batch_alter_table("venue_order") as batch:
        batch.add_column(
            sa.Column("change_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("changed_at", UTCDateTime(), nullable=True))
    op.create_index("ix_venue_order_change", "venue_order", ["change_seq", "id"])
    op.create_table(
        "change_counter",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_counter")),
    )


def downgrade() -> None:
    """Drop the counter, the index and the columns."""
    op.drop_table("change_counter")
    op.drop_index("ix_venue_order_change", table_name="venue_order")
    with op.batch_alter_table("venue_order") as batch:
        batch.drop_column("changed_at")
        batch.drop_column("change_seq")
