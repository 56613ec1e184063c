"""Indexes that read one run's report without scanning every exception event.

``exception_event`` gains ``(recon_run_id, recon_exception_id, action)``: a run's
exceptions are found, paged in order of their id and counted from this index alone,
where a report used to read every event ever written. ``recon_run`` gains
``(started_at, id)``, the order the runs list pages in. The downgrade drops both.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_INDEX = "ix_exception_event_recon_run_id_recon_exception_id_action"
_RUN_INDEX = "ix_recon_run_started_at_id"


def upgrade() -> None:
    """Create the two indexes."""
    op.create_index(
        _EVENT_INDEX, "exception_event", ["recon_run_id", "recon_exception_id", "action"]
    )
    op.create_index(_RUN_INDEX, "recon_run", ["started_at", "id"])


def downgrade() -> None:
    """Drop the two indexes."""
    op.drop_index(_RUN_INDEX, table_name="recon_run")
    op.drop_index(_EVENT_INDEX, table_name="exception_event")
