"""Connections' row ids by name: read first, written only for a name not stored yet."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from storage.connections import connection_ids
from storage.engine import make_engine, make_sessions
from storage.models import VenueConnection


def _stored(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(sa.select(VenueConnection.name, VenueConnection.id))
        return {name: row_id for name, row_id in rows}


def test_new_names_are_stored_once_and_known_ones_kept(sessions: sessionmaker[Session]) -> None:
    """The first call stores each name; later calls (one more name) answer the same ids."""
    first = connection_ids(sessions, ["main", "second", "main"])
    assert sorted(first) == ["main", "second"]
    assert _stored(sessions) == first
    again = connection_ids(sessions, ["second", "third", "main"])
    assert {name: again[name] for name in first} == first
    assert _stored(sessions) == again


def test_stored_names_are_read_while_another_writer_holds_sqlites_lock(
    sessions: sessionmaker[Session], migrated_engine: sa.Engine
) -> None:
    """With every name stored nothing is written: the ids come while another connection
    holds SQLite's write lock, where a write would fail after the lock timeout."""
    if migrated_engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's writers do not wait for one another's transactions")
    stored = connection_ids(sessions, ["main"])
    impatient = make_engine(migrated_engine.url.render_as_string(), lock_timeout=0.05)
    try:
        with migrated_engine.begin() as holder:
            holder.execute(sa.insert(VenueConnection).values(name="being-written"))
            assert connection_ids(make_sessions(impatient), ["main"]) == stored
            try:
                connection_ids(make_sessions(impatient), ["new"])
            except sa.exc.OperationalError as exc:
                assert "database is locked" in str(exc)
            else:
                raise AssertionError("a new name was stored beside the lock's holder")
    finally:
        impatient.dispose()
