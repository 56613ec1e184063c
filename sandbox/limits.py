"""The gateway's limits per API identity, enforced and counted: :class:`GatewayLimits`.

The venue's gateway lets one API identity have 5 requests in process at once and 6000
per sliding 5 minutes, and answers 429 beyond (``spec/API.md``, "Rate limits"; the
vendor's source does not hold the gateway). The sandbox does the same, in real time
whatever its own clock says, with limits set at start (``otacm sandbox
--gateway-max-in-flight``, ``--gateway-rate-limit``, ``--gateway-rate-period``; 0 turns
one off). A refused call is answered 429 with a ``Retry-After``: 1 s past the in-flight
bound, the seconds until the window's oldest call leaves it past the rate. The real
gateway queues up to 95 calls beyond the five before it refuses; the sandbox refuses at
once, so that a client that overruns the bound is seen to.

Per identity (named by :func:`identity_label`, never by its key) it counts, for
``GET /_sandbox/stats`` under ``limits``: ``requests`` (every call that reached it),
``maxInFlight`` (the most calls in process at once, the refused ones included while they
were), ``maxInWindow`` (the most calls that arrived within any one period, refused ones
included) and ``throttled`` (429s it sent for the limits). A client within the limits
shows ``maxInFlight`` and ``maxInWindow`` at or below them and ``throttled`` 0.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS = "anonymous"


def identity_label(key: str | None) -> str:
    """How the counters name the identity of an API key: a short hash, never the key."""
    if not key:
        return ANONYMOUS
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class _Identity:
    in_flight: int = 0
    arrivals: deque[float] = field(default_factory=deque)
    admitted: deque[float] = field(default_factory=deque)
    requests: int = 0
    max_in_flight: int = 0
    max_in_window: int = 0
    throttled: int = 0

    def counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "maxInFlight": self.max_in_flight,
            "maxInWindow": self.max_in_window,
            "throttled": self.throttled,
            "inFlight": self.in_flight,
        }


class GatewayLimits:
    """The gateway's in-flight bound and sliding-window rate, per identity; thread-safe.

    Args:
        max_in_flight: calls in process at once per identity; 0 for no bound.
        rate: calls per ``period`` per identity; 0 for no limit.
        period: the sliding window, in seconds.
        clock: real seconds (monotonic); tests pass a fake.
    """

    def __init__(
        self,
        max_in_flight: int,
        rate: int,
        period: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.rate = rate
        self.period = period
        self._clock = clock
        self._lock = threading.Lock()
        self._identities: dict[str, _Identity] = {}

    def enter(self, identity: str) -> int | None:
        """A call of ``identity`` arrives: ``None`` when it may go on, else the seconds of
        the 429's ``Retry-After``. Either way :meth:`leave` must follow when it is done."""
        with self._lock:
            now = self._clock()
            state = self._identities.setdefault(identity, _Identity())
            state.requests += 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            start = now - self.period
            while state.arrivals and state.arrivals[0] <= start:
                state.arrivals.popleft()
            state.arrivals.append(now)
            state.max_in_window = max(state.max_in_window, len(state.arrivals))
            while state.admitted and state.admitted[0] <= start:
                state.admitted.popleft()
            refusal: int | None = None
            if self.max_in_flight and state.in_flight > self.max_in_flight:
                refusal = 1
            elif self.rate and len(state.admitted) >= self.rate:
                refusal = max(1, math.ceil(state.admitted[0] + self.period - now))
            else:
                state.admitted.append(now)
            if refusal is not None:
                state.throttled += 1
            return refusal

    def leave(self, identity: str) -> None:
        """A call of ``identity`` that :meth:`enter` counted is answered."""
        with self._lock:
            state = self._identities.get(identity)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        """The limits and every identity's counters, as plain JSON."""
        with self._lock:
            return {
                "maxInFlight": self.max_in_flight,
                "rateLimit": self.rate,
                "ratePeriod": self.period,
                "identities": {
                    name: state.counters() for name, state in sorted(self._identities.items())
                },
            }

    def reset(self) -> None:
        """Zero the counters: what is seen from now on. Calls in process stay counted in
        flight, and the calls already admitted still count against the rate."""
        with self._lock:
            for state in self._identities.values():
                state.requests = state.throttled = state.max_in_window = 0
                state.max_in_flight = state.in_flight
                state.arrivals.clear()
