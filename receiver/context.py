"""What a receiver app holds for its lifetime, kept in ``app.extensions["otacm"]``.

:class:`Receiver` carries the engine the app owns, its session factories, the metrics,
and the venue connections: which configured ``clientState`` belongs to which connection
(compared in constant time), and each connection's row id, resolved once with
:func:`storage.models.ensure_connection`. Views reach it with :func:`current_receiver`.

The ids need a migrated database. When the database is unreachable or not migrated as
the app starts, the app starts anyway: :meth:`Receiver.connection_ids` resolves them at
the first request that needs them, and answers 503 (:class:`~receiver.errors.Unavailable`)
until it can.
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import TYPE_CHECKING, cast

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings, SettingsError
from receiver.errors import (
    DATABASE_UNAVAILABLE,
    DatabaseUnavailable,
    SchemaNotCurrent,
    Unavailable,
    describe_database_error,
)
from storage.migrate import is_current
from storage.models import ensure_connection

if TYPE_CHECKING:
    from receiver.metrics import Metrics

logger = logging.getLogger(__name__)

EXTENSION = "otacm"
"""The key of :class:`Receiver` in ``app.extensions``."""


class Receiver:
    """The receiver app's engine, sessions, metrics and venue connections.

    Args:
        settings: the settings the app was made from.
        engine: the app's engine; :meth:`close` disposes of it.
        sessions: the session factory for writes, on ``engine``.
        read_sessions: the read-only session factory, on ``engine``.
        metrics: the app's metrics.

    Raises:
        SettingsError: one webhook client state is configured for two connections, so
            a notification carrying it could not be attributed.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        sessions: sessionmaker[Session],
        read_sessions: sessionmaker[Session],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.metrics = metrics
        self._states = _client_states(settings)
        self._connection_ids: dict[str, int] | None = None
        self._resolving = threading.Lock()

    def connection_for(self, client_state: str) -> str | None:
        """The name of the connection whose configured states include ``client_state``.

        Every configured state is compared, in constant time, whatever matches: the
        time taken says nothing about which state (or how much of one) was right.
        """
        candidate = client_state.encode("utf-8")
        found = None
        for state, name in self._states:
            if hmac.compare_digest(candidate, state):
                found = name
        return found

    def connection_ids(self) -> dict[str, int]:
        """Each configured connection's row id, by name; resolved once, then remembered.

        Raises:
            SchemaNotCurrent: the database is not migrated to this code's schema.
            DatabaseUnavailable: the database cannot be reached.
        """
        resolved = self._connection_ids
        if resolved is not None:
            return resolved
        with self._resolving:
            if self._connection_ids is None:
                self._connection_ids = self._resolve()
            return self._connection_ids

    def try_resolve(self) -> bool:
        """Resolve the connection ids now if the database allows; log why not otherwise."""
        try:
            self.connection_ids()
        except Unavailable as exc:
            logger.warning("receiver not ready yet: %s", exc.message)
            return False
        return True

    def close(self) -> None:
        """Dispose of the engine: the app made it, so the app closes it."""
        self.engine.dispose()

    def _resolve(self) -> dict[str, int]:
        try:
            if not is_current(self.engine):
                raise SchemaNotCurrent()
            with self.sessions.begin() as session:
                ids = {
                    venue.name: ensure_connection(session, venue.name)
                    for venue in self.settings.connections
                }
        except DATABASE_UNAVAILABLE as exc:
            raise DatabaseUnavailable(describe_database_error(exc)) from exc
        logger.info("receiver ready for %d venue connection(s)", len(ids))
        return ids


def current_receiver() -> Receiver:
    """The :class:`Receiver` of the app handling the current request."""
    return cast(Receiver, current_app.extensions[EXTENSION])


def _client_states(settings: Settings) -> tuple[tuple[bytes, str], ...]:
    """Every configured ``(clientState, connection name)``; a state names one connection."""
    owners: dict[bytes, str] = {}
    for venue in settings.connections:
        for secret in venue.webhook_client_states:
            state = secret.get_secret_value().encode("utf-8")
            if not state:
                continue
            owner = owners.setdefault(state, venue.name)
            if owner != venue.name:
                # Never the state itself in the message: it is a secret.
                raise SettingsError(
                    f"venue connections {owner!r} and {venue.name!r} share a webhook client "
                    "state; each subscription needs its own"
                )
    return tuple((state, name) for state, name in owners.items())
