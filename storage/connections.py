"""The venue connections' rows by name: read first, written only when one is new."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.engine import SQLITE_BEGIN_OPTION
from storage.models import VenueConnection, ensure_connection


def connection_ids(sessions: sessionmaker[Session], names: Iterable[str]) -> dict[str, int]:
    """The row id of each connection of ``names``, creating the rows not stored yet.

    Read in a transaction that takes no write lock on SQLite; only names not stored yet
    are created, in a write transaction of their own. Every role and most commands start
    here, in a process whose first statements are slow (SQLAlchemy compiles each on its
    first use): in a write transaction they held SQLite's write lock 0.1-0.4 s, with the
    webhooks waiting.
    """
    wanted = sorted(set(names))
    with sessions() as session:
        session.connection(execution_options={SQLITE_BEGIN_OPTION: "DEFERRED"})
        query = sa.select(VenueConnection.name, VenueConnection.id).where(
            VenueConnection.name.in_(wanted)
        )
        known = {name: row_id for name, row_id in session.execute(query)}
    missing = [name for name in wanted if name not in known]
    if missing:
        with sessions.begin() as session:
            known.update({name: ensure_connection(session, name) for name in missing})
    return known
