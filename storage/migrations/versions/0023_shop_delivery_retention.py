"""An index by which the pruning finds the shop deliveries delivered long ago.

``shop_delivery`` gains ``(state, delivered_at)``: ``heartbeat.shop_retention`` reads
the deliveries delivered before the retention's cutoff, oldest first, as a range of it
(the in-flight indexes hold no delivered row). The downgrade drops it.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_shop_delivery_state_delivered_at"


def upgrade() -> None:
    """Create the index."""
    op.create_index(_INDEX, "shop_delivery", ["state", "delivered_at"])


def downgrade() -> None:
    """Drop the index."""
    op.drop_index(_INDEX, table_name="shop_delivery")
