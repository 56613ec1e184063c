"""The feed cursor's history: the change feed's overlap is measured in time.

``feed_mark`` records each value a partner's feed cursor reached and when, so that a
pass can re-read from the mark as it stood some minutes ago: ``rowVersion`` is one
counter for the venue's whole database, and a transaction that took its version early
can commit below the high-water mark later. Each existing cursor becomes the first mark,
recorded at its ``updated_at``. The downgrade drops the table.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``feed_mark`` and fill it with one mark per existing cursor."""
    op.create_table(
        "feed_mark",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("partner_id", sa.String(64), nullable=False),
        sa.Column("row_version", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["venue_connection.id"],
            name=op.f("fk_feed_mark_connection_id_venue_connection"),
        ),
        sa.PrimaryKeyConstraint(
            "connection_id", "partner_id", "row_version", name=op.f("pk_feed_mark")
        ),
    )
    op.execute(
        "INSERT INTO feed_mark (connection_id, partner_id, row_version, recorded_at)"
        " SELECT connection_id, partner_id, last_row_version, updated_at FROM feed_cursor"
    )


def downgrade() -> None:
    """Drop ``feed_mark``."""
    op.drop_table("feed_mark")
