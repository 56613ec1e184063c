"""The order mirror keeps its first webhook time; the inbox loses its index by order.

``venue_order.first_notified_at`` is the earliest ``timestamp`` of the venue's webhooks
for the order, which the worker now keeps as it applies them; the delivery-lag metric
reads it there. It is filled here from the webhook rows already in the inbox. The
inbox's ``(connection_id, order_id)`` index, which only that metric needed for speed,
is dropped: every webhook wrote it at a random place (an order id is a GUID). The
downgrade recreates the index and drops the column.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_inbox_connection_id_order_id"


def upgrade() -> None:
    """Add and fill ``venue_order.first_notified_at``; drop the inbox's index by order."""
    op.add_column("venue_order", sa.Column("first_notified_at", UTCDateTime(), nullable=True))
    venue_order = sa.table(
        "venue_order",
        sa.column("connection_id"),
        sa.column("order_id"),
        sa.column("first_notified_at"),
    )
    inbox = sa.table(
        "inbox",
        sa.column("connection_id"),
        sa.column("order_id"),
        sa.column("source"),
        sa.column("notified_at"),
    )
    # Filled while the index by order still serves the lookups.
    earliest = (
        sa.select(sa.func.min(inbox.c.notified_at))
        .where(
            inbox.c.connection_id == venue_order.c.connection_id,
            inbox.c.order_id == venue_order.c.order_id,
            inbox.c.source == "webhook",
        )
        .scalar_subquery()
    )
    op.execute(sa.update(venue_order).values(first_notified_at=earliest))
    op.drop_index(_INDEX, table_name="inbox")


def downgrade() -> None:
    """Recreate the inbox's index by order; drop ``venue_order.first_notified_at``."""
    op.create_index(_INDEX, "inbox", ["connection_id", "order_id"])
    with op.batch_alter_table("venue_order") as batch:
        batch.drop_column("first_notified_at")
