"""What a receiver app holds for its lifetime, kept in ``app.extensions["otacm"]``.

:class:`Receiver` carries the engine the app owns, its session factories, the metrics,
and the venue connections: which ``clientState`` belongs to which connection (compared
in constant time), and each connection's row id, resolved once with
:func:`storage.connections.connection_ids`. Views reach it with :func:`current_receiver`.

A connection's states are :meth:`venue.connection.VenueConnection.client_states`: the
configured ones and those ``otacm subscribe`` (or the scheduler's subscription check)
generated into the connection's states file. That file may change while the app runs, so the
receiver re-reads it when its size, time or inode changed: at once when a state matches
nothing (a new subscription's first webhook is accepted), and at most once every
:data:`STATE_FILE_CHECK_SECONDS` otherwise (a state retired by a rotation stops being
accepted).

The ids need a migrated database. When the database is unreachable or not migrated as
the app starts, the app starts anyway: :meth:`Receiver.connection_ids` resolves them at
the first request that needs them, and answers 503 (:class:`~receiver.errors.Unavailable`)
until it can.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from otacm.settings import Settings
from receiver.errors import (
    DATABASE_UNAVAILABLE,
    DatabaseUnavailable,
    SchemaNotCurrent,
    Unavailable,
    describe_database_error,
)
from storage.connections import connection_ids
from storage.migrate import is_current
from venue.connection import SettingsError

if TYPE_CHECKING:
    from receiver.metrics import Metrics

logger = logging.getLogger(__name__)

EXTENSION = "otacm"
"""The key of :class:`Receiver` in ``app.extensions``."""

STATE_FILE_CHECK_SECONDS = 1.0
"""How often a receiver whose states all match looks whether a states file changed."""

_StateFileStamp = tuple[tuple[int, int, int] | None, ...]


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
            a notification carrying it could not be attributed; or a states file cannot
            be read.
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
        self._state_files = tuple(
            venue.client_state_file(settings.secrets_dir) for venue in settings.connections
        )
        self._state_stamp = _stamp(self._state_files)
        self._states = _client_states(settings)
        self._states_checked_at = time.monotonic()
        self._reloading = threading.Lock()
        self._connection_ids: dict[str, int] | None = None
        self._resolving = threading.Lock()

    def connection_for(self, client_state: str) -> str | None:
        """The name of the connection whose states include ``client_state``.

        Every state is compared, in constant time, whatever matches: the time taken says
        nothing about which state (or how much of one) was right. A state that matches
        none makes the receiver look at the states files again first (see the module
        docstring).
        """
        # Whatever the text holds: an unpaired surrogate (a JSON "\ud800") encodes as
        # bytes no configured state has, so it matches nothing rather than raising.
        candidate = client_state.encode("utf-8", "surrogatepass")
        if time.monotonic() - self._states_checked_at >= STATE_FILE_CHECK_SECONDS:
            self._reload_states()
        found = _match(candidate, self._states)
        if found is None and self._reload_states():
            found = _match(candidate, self._states)
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

    def _reload_states(self) -> bool:
        """Re-read the states if a states file changed; whether they were re-read."""
        with self._reloading:
            self._states_checked_at = time.monotonic()
            stamp = _stamp(self._state_files)
            if stamp == self._state_stamp:
                return False
            try:
                states = _client_states(self.settings)
            except SettingsError as exc:
                # Keep accepting what was accepted; a person must fix the file.
                logger.error("webhook client states not reloaded: %s", exc)
                return False
            self._states, self._state_stamp = states, stamp
        logger.info("webhook client states reloaded: a states file changed")
        return True

    def _resolve(self) -> dict[str, int]:
        try:
            if not is_current(self.engine):
                raise SchemaNotCurrent()
            ids = connection_ids(self.sessions, (venue.name for venue in self.settings.connections))
        except DATABASE_UNAVAILABLE as exc:
            raise DatabaseUnavailable(describe_database_error(exc)) from exc
        logger.info("receiver ready for %d venue connection(s)", len(ids))
        return ids


def current_receiver() -> Receiver:
    """The :class:`Receiver` of the app handling the current request."""
    return cast(Receiver, current_app.extensions[EXTENSION])


def _match(candidate: bytes, states: tuple[tuple[bytes, str], ...]) -> str | None:
    found = None
    for state, name in states:
        if hmac.compare_digest(candidate, state):
            found = name
    return found


def _stamp(paths: tuple[Path, ...]) -> _StateFileStamp:
    """What tells a file changed: inode, size and modification time; ``None`` if absent."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((status.st_ino, status.st_size, status.st_mtime_ns))
    return tuple(stamps)


def _client_states(settings: Settings) -> tuple[tuple[bytes, str], ...]:
    """Every ``(clientState, connection name)``; a state names one connection."""
    owners: dict[bytes, str] = {}
    for venue in settings.connections:
        for secret in venue.client_states(settings.secrets_dir):
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
