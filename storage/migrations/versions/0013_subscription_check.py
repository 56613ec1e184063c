"""What the scheduled subscription check last found, per venue connection.

``subscription_check`` keeps one row per connection: when it was checked, whether a
usable webhook subscription was there afterwards, when one last had to be recreated,
and the last failure. ``/metrics`` reads it, so that an alert sees a missing or
inactive subscription whichever process ran the check. The downgrade drops the table.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``subscription_check``."""
    op.create_table(
        "subscription_check",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("checked_at", UTCDateTime(), nullable=False),
        sa.Column("usable", sa.Boolean(), nullable=False),
        sa.Column("recreated_at", UTCDateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_subscription_check")),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["venue_connection.id"],
            name=op.f("fk_subscription_check_connection_id_venue_connection"),
        ),
    )


def downgrade() -> None:
    """Drop ``subscription_check``."""
    op.drop_table("subscription_check")
