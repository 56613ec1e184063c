"""Orders' amounts are what their wallets carry, added up (no scaling by quantity).

The venue prices each wallet with everything it holds (CMTicketIssuer
``AccumulatePriceOnWallet``, CMCouponIssuer): a group ticket's one wallet already carries
the per-person price times the quantity. Totals kept before this revision scaled every
item's wallets by quantity / wallets, which counted a group sale ``quantity`` times over
and made it a false amount mismatch. Every stored order's totals are recomputed with
``storage.totals.order_totals`` (through ``storage.refill``), a thousand orders at a time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from storage.refill import refill_order_totals

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Recompute every stored order's totals from its items and wallets."""
    refill_order_totals(op.get_bind())


def downgrade() -> None:
    """Keep the totals as they are.

    The scaled amounts were wrong for group tickets; recomputing them would restore a
    false mismatch, and the schema is unchanged, so there is nothing to undo.
    """
