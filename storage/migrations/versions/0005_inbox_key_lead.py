"""Inbox dedup keys lead with the notification's own time.

``storage.models.inbox_dedup_key`` now puts the digits of a notification's ``timestamp``
before the hash of its payload, so that new keys arrive in about the order of the unique
index ``(connection_id, dedup_key)`` instead of at random places in it. Existing rows get
their key recomputed from their stored payload by the same functions the receiver uses
(``canonical_payload``, ``inbox_dedup_key``), a thousand rows at a time, so that a
repeat of a notification stored before the upgrade is still recognized as one. The
downgrade puts back the plain hash. (If either function changes again, a new migration
must recompute the keys the same way.)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from storage.models import canonical_payload, inbox_dedup_key

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def upgrade() -> None:
    """Recompute every inbox row's key, led by its notification's time."""
    _rekey(lambda payload: inbox_dedup_key(canonical_payload(payload), payload.get("timestamp")))


def downgrade() -> None:
    """Recompute every inbox row's key as the plain hash of its payload."""
    _rekey(lambda payload: inbox_dedup_key(canonical_payload(payload)))


def _rekey(key_of: Callable[[dict[str, Any]], str]) -> None:
    bind = op.get_bind()
    inbox = sa.table(
        "inbox", sa.column("id"), sa.column("payload", sa.JSON()), sa.column("dedup_key")
    )
    set_key = (
        sa.update(inbox)
        .where(inbox.c.id == sa.bindparam("row_id"))
        .values(dedup_key=sa.bindparam("key"))
    )
    after = 0
    while True:
        rows = bind.execute(
            sa.select(inbox.c.id, inbox.c.payload)
            .where(inbox.c.id > after)
            .order_by(inbox.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        bind.execute(set_key, [{"row_id": row.id, "key": key_of(row.payload)} for row in rows])
        after = rows[-1].id
