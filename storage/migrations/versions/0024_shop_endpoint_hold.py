"""A shop endpoint's ``Retry-After`` hold, shared by every sender of it.

``shop_endpoint_hold`` holds, per endpoint name, until when the endpoint asked not to be
sent to; ``orders.shop_delivery`` writes it with the answer and reads it before each
claim. The downgrade drops it.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table."""
    op.create_table(
        "shop_endpoint_hold",
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("hold_until", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("endpoint", name=op.f("pk_shop_endpoint_hold")),
    )


def downgrade() -> None:
    """Drop the table."""
    op.drop_table("shop_endpoint_hold")
