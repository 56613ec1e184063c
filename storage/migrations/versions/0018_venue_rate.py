"""The venue's rate limit shared by every process of an API identity: ``venue_rate``.

One row per API identity (named by a hash of the API root and key, never the key): the
theoretical arrival time of its generic cell rate algorithm and the time a
``Retry-After`` holds its calls until (:mod:`storage.venue_limits`). PostgreSQL uses it;
SQLite keeps the same state in a file beside the database, so the table stays empty
there. The downgrade drops it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table."""
    op.create_table(
        "venue_rate",
        sa.Column("identity", sa.String(64), nullable=False),
        sa.Column("tat", sa.Float(), nullable=False),
        sa.Column("hold_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("identity", name=op.f("pk_venue_rate")),
    )


def downgrade() -> None:
    """Drop the table."""
    op.drop_table("venue_rate")
