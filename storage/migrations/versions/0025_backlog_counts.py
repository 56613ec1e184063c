"""Indexes that count the backlogs ``/metrics`` reports whatever the history.

The orders in Error the venue still holds: the order's ``(connection_id, status)``
index becomes ``(connection_id, status, removed_at)``. The open reconciliation
exceptions by category: ``(connection_id, state)`` becomes ``(connection_id, state,
category)``. Each backlog is then counted from its index alone. The downgrade restores
the previous indexes.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REPLACED = (
    ("venue_order", ["connection_id", "status"], ["connection_id", "status", "removed_at"]),
    ("recon_exception", ["connection_id", "state"], ["connection_id", "state", "category"]),
)
"""Per table, the index replaced and the one replacing it, by their columns."""


def _name(table: str, columns: list[str]) -> str:
    return f"ix_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    """Each wider index made, then the one it replaces dropped."""
    for table, old, new in _REPLACED:
        op.create_index(op.f(_name(table, new)), table, new)
        op.drop_index(op.f(_name(table, old)), table_name=table)


def downgrade() -> None:
    """The previous indexes restored."""
    for table, old, new in _REPLACED:
        op.create_index(op.f(_name(table, old)), table, old)
        op.drop_index(op.f(_name(table, new)), table_name=table)
