"""Orders of partners not configured for a connection are remembered by id alone.

The venue's webhooks and getOrder are company-wide, so other partners' orders reach
otacm. ``foreign_order`` keeps, per connection, the id (and partner) of each such order
the worker fetched once, and nothing else of it, so that later notifications of it are
settled with no venue call. Orders of such partners already in the mirror are erased by
:func:`orders.mirror.forget_foreign_orders` when the worker or scheduler starts (it
needs the settings' partners, which a migration does not have). The downgrade drops the
table.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``foreign_order``."""
    op.create_table(
        "foreign_order",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("noted_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_foreign_order")),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["venue_connection.id"],
            name=op.f("fk_foreign_order_connection_id_venue_connection"),
        ),
        sa.UniqueConstraint(
            "connection_id", "order_id", name=op.f("uq_foreign_order_connection_id_order_id")
        ),
    )


def downgrade() -> None:
    """Drop ``foreign_order``."""
    op.drop_table("foreign_order")
