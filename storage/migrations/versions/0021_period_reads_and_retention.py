"""A reconciliation reads its period's orders by time; pruning keeps its place.

``venue_order`` gains an index by ``(connection_id, received_at)`` and a partial one by
``(connection_id, first_seen_at)`` of the orders the venue gave no ``receivedAt``: a
run's orphans are read as ranges of them (``reconciler.findings``) instead of every order
of the connection. ``prune_mark`` keeps how far the pruning of old rows has gone
(``heartbeat.retention``); what it reads is indexed: ``outbox``'s calls but creates by
state and ``sent_at`` (partial), ``recon_exception`` by ``venue_order_id`` (the story of an
order with an exception not closed is kept). The downgrade drops all of it.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same texts as storage.models' partial indexes: SQLite matches them term for term.
_UNRECEIVED = sa.text("received_at IS NULL")
_NOT_CREATE = sa.text("operation <> 'create'")


def upgrade() -> None:
    """Create the indexes and the table."""
    op.create_index(
        "ix_venue_order_connection_id_received_at", "venue_order", ["connection_id", "received_at"]
    )
    op.create_index(
        "ix_venue_order_connection_id_first_seen_at",
        "venue_order",
        ["connection_id", "first_seen_at"],
        postgresql_where=_UNRECEIVED,
        sqlite_where=_UNRECEIVED,
    )
    op.create_index(
        "ix_outbox_state_sent_at",
        "outbox",
        ["state", "sent_at"],
        postgresql_where=_NOT_CREATE,
        sqlite_where=_NOT_CREATE,
    )
    op.create_index("ix_recon_exception_venue_order_id", "recon_exception", ["venue_order_id"])
    op.create_table(
        "prune_mark",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("reached_at", UTCDateTime(), nullable=False),
        sa.Column("reached_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_prune_mark")),
    )


def downgrade() -> None:
    """Drop the table and the indexes."""
    op.drop_table("prune_mark")
    op.drop_index("ix_recon_exception_venue_order_id", table_name="recon_exception")
    op.drop_index("ix_outbox_state_sent_at", table_name="outbox")
    op.drop_index("ix_venue_order_connection_id_first_seen_at", table_name="venue_order")
    op.drop_index("ix_venue_order_connection_id_received_at", table_name="venue_order")
