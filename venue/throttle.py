"""The client's politeness towards the venue's per-identity limits, and its Retry-After.

The venue's gateway allows one API identity 5 requests in process at once and 6000 per
sliding 5 minutes (about 20 a second); beyond that it answers 429, sometimes with a
``Retry-After``. A :class:`Throttle` keeps calls below both and holds every call back
until a ``Retry-After`` has passed: a bounded semaphore for requests in flight, a sliding
window of start times for the rate, and a hold-off time. It does so for the threads of
one process: :func:`throttle_for` hands every client of the same identity in this
process the same one.

Processes and nodes that share a key share its limit through a :class:`SharedThrottle`:
the same three rules kept in a place every process of the identity reaches (the otacm
database, or files beside a SQLite one: :mod:`storage.venue_limits`). Its rate is a
generic cell rate algorithm (one "theoretical arrival time" per identity, moved on by
``period / (rate - burst)`` each start), so a single value says whether a start fits,
however many processes ask; :class:`Limits` derives its interval and burst so that no
window of ``period`` seconds ever holds more than ``rate`` starts.

Importing this module creates no throttle and starts nothing.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

MAX_IN_FLIGHT = 5
MAX_PER_SECOND = 20

VENUE_MAX_IN_FLIGHT = 5
VENUE_RATE = 6000
VENUE_PERIOD = 300.0
"""The gateway's documented limits per API identity (``spec/API.md``, "Rate limits")."""

DEFAULT_MAX_IN_FLIGHT = 4
DEFAULT_RATE = 5400
DEFAULT_PERIOD = 300.0
"""otacm's defaults: one place in flight and a tenth of the rate below the venue's. A
request the client gave up on (its read timeout) may still be in process at the gateway,
which queues calls up to 8 minutes, and tools that do not share the limit (``otacm
doctor``, a person's ``curl``) spend the same key; the margin leaves room for both."""

CLOSE_WAIT = 10.0
"""The longest :meth:`SharedThrottle.cancel` waits for the threads waiting for a place to
end (each is woken, so it should not need more than a moment)."""

MAX_HOLD = 3600.0
"""The longest a ``Retry-After`` holds calls back; a longer one (or a clock that jumped)
is cut to this."""


class HeldOff(Exception):
    """The venue's ``Retry-After`` holds every call of this identity for ``seconds`` more,
    longer than the caller would wait: the call was not sent."""

    def __init__(self, seconds: float, message: str | None = None) -> None:
        super().__init__(message or f"the venue asked to wait {seconds:.0f} s before the next call")
        self.seconds = seconds


class NoPlaceFree(HeldOff):
    """Every place in flight of the identity stayed taken (by other processes) for as long
    as the caller would wait: the call was not sent, and may be tried again at once
    (``seconds`` is 0), like any call the venue's limit held back."""

    def __init__(self, waited: float, message: str | None = None) -> None:
        super().__init__(
            0.0, message or f"no place in flight of this API key came free within {waited:.1f} s"
        )
        self.waited = waited


class ThrottleClosed(NoPlaceFree):
    """The throttle was cancelled while the call waited for a place or its start (its
    process is stopping: :meth:`SharedThrottle.cancel`): the call was not sent, through no
    fault of the venue's or the caller's, and is for another process, or a later one, to
    make."""

    def __init__(self, waited: float) -> None:
        super().__init__(waited, "the venue's limit was closed: this process is stopping")


@dataclass(frozen=True)
class Limits:
    """One identity's limits: ``max_in_flight`` at once, ``rate`` starts per ``period`` s."""

    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    rate: int = DEFAULT_RATE
    period: float = DEFAULT_PERIOD

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.rate < 1 or not self.period > 0:
            raise ValueError("limits need max_in_flight >= 1, rate >= 1 and period > 0")

    @property
    def burst(self) -> int:
        """Starts allowed back to back after a quiet spell: one per place in flight."""
        return max(1, min(self.max_in_flight, self.rate - 1))

    @property
    def interval(self) -> float:
        """Seconds each start moves the theoretical arrival time on.

        With ``b`` the burst, ``n`` starts spread over ``t`` seconds satisfy
        ``(n - b) * interval <= t``; for ``t <= period`` that is ``n <= rate``.
        """
        return self.period / max(1, self.rate - self.burst)

    @property
    def tolerance(self) -> float:
        """How far ahead of now the theoretical arrival time may be for a start to fit."""
        return (self.burst - 1) * self.interval


def next_start(tat: float, now: float, limits: Limits) -> tuple[float, float]:
    """The generic cell rate algorithm's step: may a call start at ``now``?

    Args:
        tat: the identity's theoretical arrival time (0 when none was stored).
        now: the time, on the same clock.
        limits: the rate.

    Returns:
        ``(0, new tat)`` when the call may start (store the new tat), else ``(wait,
        tat)``: the seconds until it may. A tat further ahead than any start could have
        put it (a clock moved back) is read as that far, so it never stalls the identity.
    """
    tat = min(tat, now + limits.tolerance + limits.interval)
    base = max(tat, now)
    wait = base - limits.tolerance - now
    if wait <= 0:
        return 0.0, base + limits.interval
    return wait, tat


def identity_key(identity: tuple[str, str]) -> str:
    """A stable name for an API identity (API root and key) that does not reveal the key:
    the hex SHA-256 of both, what shared limiter state is stored under."""
    root, key = identity
    return hashlib.sha256(f"{root}\n{key}".encode()).hexdigest()


class Throttle:
    """At most ``max_in_flight`` requests at once and ``rate`` starts per ``period`` seconds,
    none before a ``Retry-After`` has passed; for the threads of one process.

    Thread-safe. ``clock`` and ``sleep`` are injectable so tests can run on a fake clock.
    """

    def __init__(
        self,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        rate: int = MAX_PER_SECOND,
        period: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_in_flight < 1 or rate < 1 or period <= 0:
            raise ValueError("a throttle needs max_in_flight >= 1, rate >= 1 and period > 0")
        self.max_in_flight = max_in_flight
        self.rate = rate
        self.period = period
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._starts: deque[float] = deque()
        self._hold_until = -math.inf
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    @contextmanager
    def slot(self, *, max_hold: float = math.inf) -> Iterator[None]:
        """Hold one of the in-flight places for one request, started within the rate.

        Args:
            max_hold: the longest the caller waits for a ``Retry-After`` to pass, and (for
                a shared throttle) for a place in flight that other processes hold.

        Raises:
            HeldOff: a ``Retry-After`` holds calls longer than ``max_hold``; nothing waited.
            NoPlaceFree: no place in flight came free within ``max_hold``.
            ThrottleClosed: a shared throttle was cancelled while the call waited.
        """
        # The in-flight place first: a request waiting for the rate must not start late
        # in a burst with others released by the semaphore.
        with self._in_flight, self._place(max_hold):
            self._wait_to_start(max_hold)
            yield

    def hold_off(self, seconds: float) -> None:
        """No call of this identity starts for ``seconds`` (a ``Retry-After``)."""
        with self._lock:
            until = self._clock() + min(max(seconds, 0.0), MAX_HOLD)
            self._hold_until = max(self._hold_until, until)

    def _place(self, max_wait: float) -> AbstractContextManager[None]:
        """The place in flight beyond this process; here, none is needed."""
        return _nothing()

    def _wait_to_start(self, max_hold: float) -> None:
        while True:
            wait, held = self._try_start()
            if wait <= 0:
                return
            if held and wait > max_hold:
                raise HeldOff(wait)
            self._sleep(wait)

    def _try_start(self) -> tuple[float, bool]:
        """Start now if allowed: ``(0, False)``; else the seconds to wait and whether it is a
        ``Retry-After`` that holds the call."""
        with self._lock:
            now = self._clock()
            if now < self._hold_until:
                return self._hold_until - now, True
            while self._starts and now - self._starts[0] >= self.period:
                self._starts.popleft()
            if len(self._starts) < self.rate:
                self._starts.append(now)
                return 0.0, False
            return self.period - (now - self._starts[0]), False


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class SharedThrottle(Throttle, ABC):
    """A :class:`Throttle` whose places, rate and hold-off are shared with every process of
    the identity, wherever the subclass keeps them.

    The in-process semaphore still comes first, so a process never asks the shared store
    for more places than ``max_in_flight``. A subclass provides :meth:`_wait_for_place`
    (a place in flight that is freed when its holder dies, waited for until one frees:
    the waiter is woken by the release, it does not poll), :meth:`_take_start` (one
    atomic step of :func:`next_start` against the stored arrival time and hold-off) and
    :meth:`_store_hold`.

    Args:
        limits: the identity's limits.
        sleep: how to wait for the rate or a ``Retry-After`` (tests pass a fake); by
            default on the throttle's closing, which ends the wait.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(
            max_in_flight=limits.max_in_flight,
            rate=limits.rate,
            period=limits.period,
            sleep=sleep or self._sleep_unless_closed,
        )
        self.limits = limits
        self._closing = threading.Event()
        self._waits = 0
        self._waits_changed = threading.Condition()

    @contextmanager
    def _place(self, max_wait: float) -> Iterator[None]:
        started = time.monotonic()
        with self._waits_changed:
            self._waits += 1
        try:
            place = None if self._closing.is_set() else self._wait_for_place(max_wait)
        finally:
            with self._waits_changed:
                self._waits -= 1
                self._waits_changed.notify_all()
        if place is None:
            waited = time.monotonic() - started
            raise ThrottleClosed(waited) if self._closing.is_set() else NoPlaceFree(waited)
        with place:
            yield

    def _sleep_unless_closed(self, seconds: float) -> None:
        """Wait for the rate or a ``Retry-After``, unless the throttle closes first.

        Raises:
            ThrottleClosed: it closed (the call's place is let go on the way out).
        """
        started = time.monotonic()
        if self._closing.wait(seconds):
            raise ThrottleClosed(time.monotonic() - started)

    def hold_off(self, seconds: float) -> None:
        """No call of this identity, in any process, starts for ``seconds``."""
        self._store_hold(min(max(seconds, 0.0), MAX_HOLD))

    def _try_start(self) -> tuple[float, bool]:
        return self._take_start()

    @abstractmethod
    def _wait_for_place(self, timeout: float) -> AbstractContextManager[None] | None:
        """A place in flight, held until the context exits, waited for up to ``timeout``
        seconds (``math.inf``: no limit; 0: only a free one); ``None`` if none came free
        in time, or the throttle is closing (a waiter looks at ``_closing`` at least every
        second, or is woken by :meth:`_wake_waiters`)."""

    @abstractmethod
    def _take_start(self) -> tuple[float, bool]:
        """Record a start now if the hold-off and the rate allow it: ``(0, False)``; else
        the seconds to wait and whether a hold-off is the reason."""

    @abstractmethod
    def _store_hold(self, seconds: float) -> None:
        """Make the identity's hold-off end no earlier than ``seconds`` from now."""

    def cancel(self) -> None:
        """End every wait for a place or a start (each raises :class:`ThrottleClosed`); calls
        made after this raise it at once. Places held stay held until released, and what
        the store holds stays open for them until :meth:`close`."""
        self._closing.set()
        deadline = time.monotonic() + CLOSE_WAIT
        with self._waits_changed:
            # Woken again and again: a waiter about to block when it was woken blocks
            # on, and the next wake-up ends it.
            while self._waits and (remaining := deadline - time.monotonic()) > 0:
                self._wake_waiters()
                self._waits_changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        """:meth:`cancel`, then release what the store holds (connections, files): once the
        calls that held places have ended, or they may not release them cleanly."""
        self.cancel()
        self._release_store()

    def _wake_waiters(self) -> None:
        """Wake the threads waiting for a place, so they see the throttle is closing."""

    def _release_store(self) -> None:
        """Release what the store holds, once no thread waits for a place."""


_registry: dict[Hashable, Throttle] = {}
_registry_lock = threading.Lock()


def throttle_for(identity: Hashable, limits: Limits | None = None) -> Throttle:
    """The process-wide throttle of one API identity, created on first use.

    Args:
        identity: what the venue counts by (:attr:`VenueConnection.api_identity`).
        limits: the identity's limits when the throttle is made; the venue's documented
            ones per second (5 in flight, 20 a second) when not given.
    """
    with _registry_lock:
        throttle = _registry.get(identity)
        if throttle is None:
            if limits is None:
                throttle = Throttle()
            else:
                throttle = Throttle(
                    max_in_flight=limits.max_in_flight, rate=limits.rate, period=limits.period
                )
            _registry[identity] = throttle
        return throttle
