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

**Waiting for a place** blocks until a release wakes the waiter; nothing polls at the
pace of the requests. On PostgreSQL a taker first takes one more advisory lock, the
identity's *turnstile*: at once when nobody holds it, else queued behind those who asked
before, in a blocking ``pg_advisory_lock`` bounded by ``lock_timeout`` (the caller's
longest wait). The server grants it in the order asked, so processes and nodes take
places first come, first served, and a thread that has just freed a place queues behind
those already waiting instead of taking it back. Holding the turnstile, the taker tries
the place keys; finding none free, it ``LISTEN``-s on the identity's channel, takes the
place as soon as it is woken, and lets the turnstile go to the next. A release unlocks
its place, then ``NOTIFY``-s the channel if the turnstile is held (someone may wait;
with nobody waiting a release writes nothing). When nobody waits, a take and a release
are one statement each, as they were before there was a turnstile. Weighed against the
alternatives: blocking in ``pg_advisory_lock`` on one place key the waiter picks leaves
a place idle while its waiters queue on another still held (a slow request stalls
everyone behind its key); ``LISTEN``/``NOTIFY`` alone wakes every waiter on each
release, to race for one place, in no order. Here only the turnstile's holder listens,
so a release wakes one waiter. A holder that dies sends no ``NOTIFY``: the server frees
its place, and the listener sees it at its next look, :data:`DEAD_HOLDER_LOOK` seconds
at most after. A waiter holds one connection of the throttle's pool, and a process has
at most ``max_in_flight`` threads waiting or holding (the in-process semaphore), within
the pool's size. Cancelling the throttle (:func:`cancel_shared_throttles`, as a stopping
role does) ends its waits at once; a process that dies leaves the queue with its connection.

On SQLite the places are files, which cannot be waited for with a time limit nor in a
queue: a waiter tries them, and when none is free waits on the identity's *doorbell*, a
named pipe in the lock directory that every release writes a byte to; ``select`` wakes
the waiters, which try the files again. A taker that finds someone waiting (the pipe has
a reader) waits for the next ring with them rather than take a place just rung for, so
a thread that has just freed a place does not take it back ahead of the waiters; among
those woken, the quickest wins. A dead holder rings no bell: the waiters look again
every :data:`DEAD_HOLDER_LOOK` seconds.

Rows and files are named by :func:`venue.throttle.identity_key`, never by the key.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
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
DEAD_HOLDER_LOOK = 0.25
"""Seconds a waiter for a place waits for a release's wake-up before it looks at the places
again anyway: how soon a place whose holder died (and so sent no wake-up) is taken."""

# A place: the keys tried in turn up to the first locked. Should the plan ever lock more
# than one, the place releases every lock of its connection (pg_advisory_unlock_all):
# this connection is the throttle's own, so nothing else of its locks is lost.
# The turnstile's holder: a free place, and the turnstile let go at once if one was
# taken, so the next waiter goes on while this one starts its call.
_TAKE_AND_LEAVE = sa.text(
    """
    WITH place AS MATERIALIZED (
        SELECT (
            SELECT key FROM unnest(CAST(:keys AS bigint[])) AS key
            WHERE pg_try_advisory_lock(key) LIMIT 1
        ) AS key
    )
    SELECT key, CASE WHEN key IS NOT NULL THEN pg_advisory_unlock(:turnstile) END FROM place
    """
)
# One round trip each for the common case, nobody waiting; their steps must run in order,
# which the rows flowing from one MATERIALIZED CTE into the next guarantee (and CASE,
# that a branch not taken is not evaluated).
# The fast take: the turnstile if nobody holds it, then, holding it, a free place, then
# the turnstile let go if a place was taken. (mine, NULL): the turnstile is held and every
# place taken; (false, NULL): someone else holds the turnstile.
_TAKE_IN_TURN = sa.text(
    """
    WITH turn AS MATERIALIZED (SELECT pg_try_advisory_lock(:turnstile) AS mine),
    place AS MATERIALIZED (
        SELECT turn.mine, CASE WHEN turn.mine THEN (
            SELECT key FROM unnest(CAST(:keys AS bigint[])) AS key
            WHERE pg_try_advisory_lock(key) LIMIT 1
        ) END AS key
        FROM turn
    )
    SELECT mine, key, CASE WHEN key IS NOT NULL THEN pg_advisory_unlock(:turnstile) END
    FROM place
    """
)
# The release: every lock of the connection let go, then, if the turnstile is held
# (someone may wait: only its holder does), a NOTIFY to wake it. A NOTIFY gives its
# transaction an id and its commit a WAL record; nothing is lost if that record is not on
# disk yet when the waiter wakes, so that one commit does not wait for the disk. With
# nobody waiting the release writes nothing.
_RELEASE = sa.text(
    """
    WITH freed AS MATERIALIZED (SELECT pg_advisory_unlock_all() AS done),
    turn AS MATERIALIZED (SELECT pg_try_advisory_lock(:turnstile) AS free FROM freed)
    SELECT
        CASE WHEN free THEN pg_advisory_unlock(:turnstile) END,
        CASE WHEN NOT free THEN set_config('synchronous_commit', 'off', true) END,
        CASE WHEN NOT free THEN pg_notify(:channel, '') END
    FROM turn
    """
)
_LOCK_TIMEOUT = sa.text("SELECT set_config('lock_timeout', :value, false)")
_QUEUE = sa.text("SELECT pg_advisory_lock(:turnstile)")
_LEAVE_TURN = sa.text("SELECT pg_advisory_unlock(:turnstile)")


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
        self._turnstile = advisory_lock_key(f"venue-turnstile:{identity}")
        # A channel is an identifier (at most 63 bytes): the identity's hex is safe in it.
        self._channel = f"otacm_venue_place_{identity[:40]}"
        self._waiting: set[Any] = set()
        self._waiting_lock = threading.Lock()

    @contextmanager
    def _hold_place(self, connection: sa.Connection) -> Iterator[None]:
        try:
            yield
        finally:
            try:
                connection.execute(
                    _RELEASE, {"turnstile": self._turnstile, "channel": self._channel}
                )
            except sa.exc.DBAPIError:
                # The connection is broken: its session, and with it the lock, is gone.
                connection.invalidate()
            connection.close()

    def _wait_for_place(self, timeout: float) -> AbstractContextManager[None] | None:
        deadline = time.monotonic() + timeout
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            taken = self._take_in_turn(connection, deadline)
        except BaseException:
            # Whatever failed (a cancel, a broken connection, an interrupt), the session may
            # still hold the turnstile or a place: it ends, and the server frees them.
            connection.invalidate()
            connection.close()
            raise
        if taken:
            return self._hold_place(connection)
        connection.close()
        return None

    def _take_in_turn(self, connection: sa.Connection, deadline: float) -> bool:
        """Take the turnstile, at once when nobody holds it, else queued; then, holding it,
        a place: a free one, or the first to be freed before ``deadline``."""
        turnstile = {"turnstile": self._turnstile}
        mine, key, _ = connection.execute(_TAKE_IN_TURN, {**turnstile, "keys": self._keys}).one()
        if key is not None:
            return True
        if not mine and not self._queue(connection, deadline):
            return False
        taken = False
        try:
            taken = self._take_first_freed(connection, deadline)
            return taken
        finally:
            if not taken:  # a place taken let the turnstile go in the same statement
                connection.execute(_LEAVE_TURN, turnstile)

    def _take_key(self, connection: sa.Connection) -> bool:
        """A free place, the turnstile let go with it (the caller holds the turnstile)."""
        arguments = {"keys": self._keys, "turnstile": self._turnstile}
        return connection.execute(_TAKE_AND_LEAVE, arguments).one()[0] is not None

    def _queue(self, connection: sa.Connection, deadline: float) -> bool:
        """Wait for the turnstile behind those who asked before; False when ``deadline``
        (``time.monotonic``) passed or the throttle is closing first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._closing.is_set():
            return False
        # lock_timeout 0 is no limit; any other value is at least a millisecond.
        limit = "0" if math.isinf(remaining) else f"{max(1, math.ceil(remaining * 1000))}ms"
        connection.execute(_LOCK_TIMEOUT, {"value": limit})
        driver = connection.connection.driver_connection
        with self._waiting_lock:
            self._waiting.add(driver)
        try:
            if self._closing.is_set():
                return False
            connection.execute(_QUEUE, {"turnstile": self._turnstile})
        except sa.exc.OperationalError as exc:
            # Its lock_timeout ran out (LockNotAvailable), or close() cancelled it
            # (QueryCanceled): either way the caller has waited long enough.
            if isinstance(exc.orig, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
                return False
            raise
        finally:
            with self._waiting_lock:
                self._waiting.discard(driver)
            connection.exec_driver_sql("RESET lock_timeout")
        return True

    def _take_first_freed(self, connection: sa.Connection, deadline: float) -> bool:
        if self._take_key(connection):
            return True
        if deadline <= time.monotonic() or self._closing.is_set():
            return False
        driver = connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)  # the engine's driver is psycopg 3
        connection.exec_driver_sql(f'LISTEN "{self._channel}"')
        try:
            # Listening before this look: a place freed after it wakes the wait below.
            while not self._take_key(connection):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing.is_set():
                    return False
                for _ in driver.notifies(timeout=min(remaining, DEAD_HOLDER_LOOK), stop_after=1):
                    break
            return True
        finally:
            connection.exec_driver_sql(f'UNLISTEN "{self._channel}"')

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

    def _wake_waiters(self) -> None:
        # Those queued on the turnstile: their pg_advisory_lock ends with QueryCanceled.
        # The turnstile's holder looks at _closing every DEAD_HOLDER_LOOK seconds.
        with self._waiting_lock:
            waiting = list(self._waiting)
        for driver in waiting:
            with suppress(psycopg.Error):
                driver.cancel_safe()

    def _release_store(self) -> None:
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
        self._bell = directory / f"{stem}.bell"
        self._turn = 0
        self._turn_lock = threading.Lock()

    @contextmanager
    def _hold_place(self, descriptor: int) -> Iterator[None]:
        try:
            yield
        finally:
            os.close(descriptor)  # the lock goes with the descriptor
            # The call is over, whatever its outcome: a bell that cannot be rung must not
            # fail it. The waiters then take the place at their next look.
            with suppress(OSError):
                self._ring()

    def _ring(self, *, probe: bool = False) -> bool:
        """Wake whoever waits for a place: a byte into the doorbell, if anyone has it open.

        Args:
            probe: only find out whether anyone waits; ring nothing.

        Returns:
            Whether anyone waits.
        """
        try:
            bell = os.open(self._bell, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            # ENXIO: nobody waits (no reader); ENOENT: nobody ever did.
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                return False
            raise
        try:
            if not probe:
                # Full of rings no waiter has read yet: they will wake anyway.
                with suppress(BlockingIOError):
                    os.write(bell, b"\0")
        finally:
            os.close(bell)
        return True

    @contextmanager
    def _doorbell(self) -> Iterator[int]:
        """The doorbell, open for reading: readable when a place was freed since it was
        last drained."""
        with suppress(FileExistsError):
            os.mkfifo(self._bell, 0o600)
        # Read and write: the waiter is a writer too, so the pipe never reads as ended
        # (which select would report as readable at once, for ever) between two rings.
        bell = os.open(self._bell, os.O_RDWR | os.O_NONBLOCK)
        try:
            if not stat.S_ISFIFO(os.fstat(bell).st_mode):
                raise RuntimeError(f"{self._bell} is not a named pipe")
            yield bell
        finally:
            os.close(bell)

    def _take_free_place(self) -> AbstractContextManager[None] | None:
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

    def _wait_for_place(self, timeout: float) -> AbstractContextManager[None] | None:
        deadline = time.monotonic() + timeout
        # Someone waits (has the doorbell open): a place free now is theirs, just rung
        # for; this caller waits for the next ring with them instead of taking it first.
        # Else a thread that has just released a place would take it back at once.
        others_wait = timeout > 0 and self._ring(probe=True)
        if not others_wait:
            place = self._take_free_place()
            if place is not None or timeout <= 0:
                return place
        with self._doorbell() as bell:
            # The bell is open before the next look: a place freed after it rings below.
            rung = not others_wait
            while True:
                if rung and (place := self._take_free_place()) is not None:
                    return place
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing.is_set():
                    return None
                select.select([bell], [], [], min(remaining, DEAD_HOLDER_LOOK))
                with suppress(BlockingIOError):
                    os.read(bell, 4096)
                rung = True

    def _wake_waiters(self) -> None:
        self._ring()

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


def cancel_shared_throttles(throttles: Iterable[SharedThrottle]) -> None:
    """End every wait for a place of ``throttles`` at once, and forget them: a later
    :func:`shared_throttle` makes a new one (:meth:`~venue.throttle.SharedThrottle.cancel`).

    What their store holds stays open for the calls in flight: close them
    (:func:`close_shared_throttles`) once those have ended.
    """
    for throttle in _forget(throttles):
        throttle.cancel()


def close_shared_throttles(throttles: Iterable[SharedThrottle] | None = None) -> None:
    """Close and forget throttles :func:`shared_throttle` made in this process.

    Args:
        throttles: the ones to close (those a role used); every one when not given.
    """
    for throttle in _forget(throttles):
        throttle.close()


def _forget(throttles: Iterable[SharedThrottle] | None) -> list[SharedThrottle]:
    """Take ``throttles`` (every one when ``None``) out of the registry; them, as a list.

    They are closed or cancelled outside the registry's lock: that waits for their
    waiters, which must not keep another thread from its own throttle meanwhile.
    """
    with _throttles_lock:
        chosen = list(_throttles.values()) if throttles is None else list(throttles)
        for key in [key for key, throttle in _throttles.items() if throttle in chosen]:
            del _throttles[key]
    return chosen
