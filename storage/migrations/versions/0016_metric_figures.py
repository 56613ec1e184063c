"""Figures of ``/metrics`` computed by the scheduler, and an index of status changes by time.

``metric_figures`` keeps, per name, the figures a scheduled job computed and when
(``storage.records.MetricFigures``): a scrape reads them instead of computing delivery
health over the status changes each time. ``status_change`` gains an index on
``observed_at``, which reads the delivery-health window as a range however long the
history. The downgrade drops both.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from storage.types import UTCDateTime

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table and the index."""
    op.create_table(
        "metric_figures",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("computed_at", UTCDateTime(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_metric_figures")),
    )
    op.create_index("ix_status_change_observed_at", "status_change", ["observed_at"])


def downgrade() -> None:
    """Drop the index and the table."""
    op.drop_index("ix_status_change_observed_at", table_name="status_change")
    op.drop_table("metric_figures")
