"""The client's own politeness towards the venue's per-identity rate limits.

The venue allows one API identity 5 requests in process at once and 6000 per sliding
5 minutes (about 20 a second); beyond that its gateway answers 429. A :class:`Throttle`
keeps a process below both: a bounded semaphore for requests in flight and a sliding
window of start times for the rate. :func:`throttle_for` hands every client of the same
identity in this process the same throttle; separate processes (web app, worker) each
keep their own, so the venue's limit is shared between them by configuration, not here.
Importing this module creates no throttle and starts nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

MAX_IN_FLIGHT = 5
MAX_PER_SECOND = 20


class Throttle:
    """At most ``max_in_flight`` requests at once and ``rate`` starts per ``period`` seconds.

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
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the in-flight places for one request, started within the rate."""
        # The in-flight place first: a request waiting for the rate must not start late
        # in a burst with others released by the semaphore.
        with self._in_flight:
            self._wait_for_rate()
            yield

    def _wait_for_rate(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._starts and now - self._starts[0] >= self.period:
                    self._starts.popleft()
                if len(self._starts) < self.rate:
                    self._starts.append(now)
                    return
                wait = self.period - (now - self._starts[0])
            self._sleep(wait)


_registry: dict[Hashable, Throttle] = {}
_registry_lock = threading.Lock()


def throttle_for(identity: Hashable) -> Throttle:
    """The process-wide throttle of one API identity, created on first use."""
    with _registry_lock:
        throttle = _registry.get(identity)
        if throttle is None:
            throttle = _registry[identity] = Throttle()
        return throttle
