"""The venue's per-key limits shared by every process and node: :func:`shared_throttle`.

A :class:`venue.throttle.SharedThrottle` needs three things every process of one API
identity can reach: places in flight that are freed when their holder dies, the
identity's theoretical arrival time (the rate, :func:`venue.throttle.next_start`) and
its hold-off (a ``Retry-After``). Both are kept beside the data otacm already shares:

- **PostgreSQL** (any number of nodes): a place is a session advisory lock on one of
  ``max_in_flight`` keys (:func:`storage.locks.advisory_lock_key`), held on a connection
  of the throttle's own pool for the length of the request; the server frees it when the
  holder's connection ends, however the process died. The arrival time and hold-off are
  one ``venue_rate`` row per identity, moved on by a single conditional ``UPDATE`` on the
  server's clock, so nodes whose clocks differ still agree.
- **SQLite** (one box): a place is an ``flock`` on one of ``max_in_flight`` files in the
  database's lock directory (:func:`storage.locks.default_lock_dir`), freed by the kernel
  when the holder dies; the arrival time and hold-off are a small file there, read and
  written under its own ``flock``, on the box's clock. Nothing is written to the
  database, whose single write lock the webhooks need.

Rows and files are named by :func:`venue.throttle.identity_key`, never by the key.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from storage.locks import advisory_lock_key, default_lock_dir
from storage.models import Base
from venue.connection import VenueConnection
from venue.throttle import MAX_HOLD, Limits, SharedThrottle, identity_key, next_start


class VenueRate(Base):
    """One API identity's shared rate state (PostgreSQL; SQLite keeps it in a file).

    Attributes:
        identity: :func:`venue.throttle.identity_key` of the API root and key.
        tat: the theoretical arrival time, seconds since the epoch on the server's clock.
        hold_until: no call starts before this (a ``Retry-After``), same clock.
    """

    __tablename__ = "venue_rate"

    identity: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tat: Mapped[float] = mapped_column(sa.Float, default=0.0)
    hold_until: Mapped[float] = mapped_column(sa.Float, default=0.0)


# Every time is the server's (clock_timestamp(), seconds since the epoch): nodes whose
# own clocks differ still agree on it.
_START = sa.text(
    """
    WITH clock AS (SELECT CAST(extract(epoch FROM clock_timestamp()) AS float8) AS now)
    UPDATE venue_rate
    SET tat = GREATEST(LEAST(tat, clock.now + :ahead), clock.now) + :interval
    FROM clock
    WHERE identity = :identity
      AND hold_until <= clock.now
      AND GREATEST(LEAST(tat, clock.now + :ahead), clock.now) - :tolerance <= clock.now
    RETURNING tat
    """
)
_READ = sa.text(
    "SELECT tat, hold_until, CAST(extract(epoch FROM clock_timestamp()) AS float8) AS now "
    "FROM venue_rate WHERE identity = :identity"
)
_CREATE = sa.text(
    "INSERT INTO venue_rate (identity, tat, hold_until) VALUES (:identity, 0, 0) "
    "ON CONFLICT (identity) DO NOTHING"
)
_HOLD = sa.text(
    """
    INSERT INTO venue_rate (identity, tat, hold_until)
    VALUES (:identity, 0, CAST(extract(epoch FROM clock_timestamp()) AS float8) + :seconds)
    ON CONFLICT (identity)
    DO UPDATE SET hold_until = GREATEST(venue_rate.hold_until, EXCLUDED.hold_until)
    """
)
# Tries the keys in turn and stops at the first it locks. Should the plan ever lock more
# than one, the place releases every lock of its connection (pg_advisory_unlock_all):
# this connection is the throttle's own, so nothing else of its locks is lost.
_TAKE_PLACE = sa.text(
    "SELECT key FROM unnest(CAST(:keys AS bigint[])) AS key WHERE pg_try_advisory_lock(key) LIMIT 1"
)
_RELEASE = sa.text("SELECT pg_advisory_unlock_all()")


class PostgresThrottle(SharedThrottle):
    """Places as advisory locks, the rate and hold-off in ``venue_rate`` (module docstring).

    Args:
        url: the otacm database; the throttle opens a pool of its own on it.
        identity: :func:`venue.throttle.identity_key` of the API identity.
        limits: the identity's limits.
    """

    def __init__(self, url: sa.URL, identity: str, limits: Limits) -> None:
        super().__init__(limits)
        from storage.engine import make_engine

        self._engine = make_engine(url.render_as_string(hide_password=False))
        self._identity = identity
        self._keys = [
            advisory_lock_key(f"venue-place:{identity}:{n}") for n in range(limits.max_in_flight)
        ]
        self._turn = 0
        self._turn_lock = threading.Lock()

    @contextmanager
    def _hold_place(self, connection: sa.Connection) -> Iterator[None]:
        try:
            yield
        finally:
            try:
                connection.execute(_RELEASE)
            except sa.exc.DBAPIError:
                # The connection is broken: its session, and with it the lock, is gone.
                connection.invalidate()
            connection.close()

    def _take_place(self) -> AbstractContextManager[None] | None:
        with self._turn_lock:
            # Each try starts at another key, so waiting processes do not all race for one.
            self._turn = (self._turn + 1) % len(self._keys)
            keys = self._keys[self._turn :] + self._keys[: self._turn]
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = connection.execute(_TAKE_PLACE, {"keys": keys}).first()
        except BaseException:
            connection.close()
            raise
        if taken is None:
            connection.close()
            return None
        return self._hold_place(connection)

    def _take_start(self) -> tuple[float, bool]:
        limits = self.limits
        arguments = {
            "identity": self._identity,
            "interval": limits.interval,
            "tolerance": limits.tolerance,
            "ahead": limits.tolerance + limits.interval,
        }
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            while True:
                if db.execute(_START, arguments).first() is not None:
                    return 0.0, False
                row = db.execute(_READ, arguments).first()
                if row is None:
                    db.execute(_CREATE, arguments)
                    continue
                if row.hold_until > row.now:
                    return row.hold_until - row.now, True
                wait, _ = next_start(row.tat, row.now, limits)
                if wait > 0:
                    return wait, False
                # Another process moved the row between the UPDATE and the read: try again.

    def _store_hold(self, seconds: float) -> None:
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.execute(_HOLD, {"identity": self._identity, "seconds": seconds})

    def close(self) -> None:
        """Close the throttle's connections."""
        self._engine.dispose()


_STATE = struct.Struct("<dd")
"""The SQLite form's state file: the theoretical arrival time and the hold-off, as two
doubles of seconds since the epoch."""


class FileThrottle(SharedThrottle):
    """Places as ``flock``-ed files, the rate and hold-off in a state file (module docstring).

    Args:
        directory: where the files live (the database's lock directory).
        identity: :func:`venue.throttle.identity_key` of the API identity.
        limits: the identity's limits.
    """

    def __init__(self, directory: Path, identity: str, limits: Limits) -> None:
        super().__init__(limits)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stem = f"venue-{identity[:32]}"
        self._places = [directory / f"{stem}.place{n}" for n in range(limits.max_in_flight)]
        self._state = directory / f"{stem}.rate"
        self._turn = 0
        self._turn_lock = threading.Lock()

    @contextmanager
    def _hold_place(self, descriptor: int) -> Iterator[None]:
        try:
            yield
        finally:
            os.close(descriptor)  # the lock goes with the descriptor

    def _take_place(self) -> AbstractContextManager[None] | None:
        with self._turn_lock:
            self._turn = (self._turn + 1) % len(self._places)
            places = self._places[self._turn :] + self._places[: self._turn]
        for place in places:
            descriptor = os.open(place, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            except BaseException:
                os.close(descriptor)
                raise
            return self._hold_place(descriptor)
        return None

    @contextmanager
    def _locked_state(self) -> Iterator[tuple[int, float, float]]:
        descriptor = os.open(self._state, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            data = os.pread(descriptor, _STATE.size, 0)
            tat, hold_until = _STATE.unpack(data) if len(data) == _STATE.size else (0.0, 0.0)
            yield descriptor, tat, hold_until
        finally:
            os.close(descriptor)

    def _take_start(self) -> tuple[float, bool]:
        with self._locked_state() as (descriptor, tat, hold_until):
            now = time.time()
            if hold_until > now:
                # A clock moved back must not hold calls longer than a Retry-After could.
                return min(hold_until - now, MAX_HOLD), True
            wait, tat = next_start(tat, now, self.limits)
            if wait > 0:
                return wait, False
            os.pwrite(descriptor, _STATE.pack(tat, hold_until), 0)
            return 0.0, False

    def _store_hold(self, seconds: float) -> None:
        with self._locked_state() as (descriptor, tat, hold_until):
            hold_until = max(hold_until, time.time() + seconds)
            os.pwrite(descriptor, _STATE.pack(tat, hold_until), 0)


_throttles: dict[tuple[str, str, Limits], SharedThrottle] = {}
_throttles_lock = threading.Lock()


def shared_throttle(engine: sa.Engine, connection: VenueConnection) -> SharedThrottle:
    """The throttle every process using ``engine``'s database shares for ``connection``'s key.

    One per database, identity and limits in a process (made on first use and kept): the
    web app's requests, a worker's fetching threads and its scheduler's jobs all share
    it, and through the database every other process and node does too.

    Args:
        engine: the otacm database's engine (PostgreSQL or SQLite).
        connection: the venue connection: its API identity and limits.
    """
    url = engine.url
    identity = identity_key(connection.api_identity)
    key = (url.render_as_string(hide_password=False), identity, connection.limits)
    with _throttles_lock:
        throttle = _throttles.get(key)
        if throttle is None:
            if url.get_backend_name() == "postgresql":
                throttle = PostgresThrottle(url, key[1], connection.limits)
            else:
                throttle = FileThrottle(default_lock_dir(engine), key[1], connection.limits)
            _throttles[key] = throttle
        return throttle


def close_shared_throttles() -> None:
    """Close and forget every throttle :func:`shared_throttle` made in this process."""
    with _throttles_lock:
        for throttle in _throttles.values():
            throttle.close()
        _throttles.clear()
