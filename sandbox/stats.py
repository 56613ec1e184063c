"""The counters ``GET /_sandbox/stats`` reports: API calls, webhooks, pipeline work.

Benchmarks read API quota use from ``calls`` (by endpoint name, then HTTP status); tests
compare what a receiver saw with ``webhooks``:

- ``sent``: notifications POSTed and answered 2xx (a duplicate counts again);
- ``failed``: notifications given up on after the last attempt or a final 4xx;
- ``dropped`` / ``duplicated``: notifications removed or repeated by the faults;
- ``posts`` / ``retries``: webhook POST attempts, and how many of them were retries;
- ``pending``: notifications queued and not yet settled.

and ``gateway``: ``answersLost``, answers of calls that took effect, lost by the fault.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

WEBHOOK_COUNTERS = ("sent", "failed", "dropped", "duplicated", "posts", "retries")
PIPELINE_COUNTERS = ("cycles", "processed", "stalled", "held", "rescheduled", "timedOut")
GATEWAY_COUNTERS = ("answersLost",)


class Stats:
    """Thread-safe counters; a snapshot is plain JSON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._webhooks: Counter[str] = Counter()
        self._pipeline: Counter[str] = Counter()
        self._gateway: Counter[str] = Counter()
        self._pending = 0

    def record_call(self, endpoint: str, status: int) -> None:
        """Count one API call to ``endpoint`` answered with ``status``."""
        with self._lock:
            self._calls[endpoint][str(status)] += 1

    def webhooks(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to the webhook counter ``counter`` (one of ``WEBHOOK_COUNTERS``)."""
        with self._lock:
            self._webhooks[counter] += amount

    def pending(self, amount: int) -> None:
        """Notifications queued (positive) or settled (negative)."""
        with self._lock:
            self._pending += amount

    def pipeline(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to the pipeline counter ``counter``."""
        with self._lock:
            self._pipeline[counter] += amount

    def gateway(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to the gateway counter ``counter`` (one of ``GATEWAY_COUNTERS``)."""
        with self._lock:
            self._gateway[counter] += amount

    def snapshot(self) -> dict[str, Any]:
        """All counters now, every known counter present even when zero."""
        with self._lock:
            webhooks = {name: self._webhooks[name] for name in WEBHOOK_COUNTERS}
            webhooks["pending"] = self._pending
            return {
                "calls": {name: dict(sorted(c.items())) for name, c in sorted(self._calls.items())},
                "webhooks": webhooks,
                "pipeline": {name: self._pipeline[name] for name in PIPELINE_COUNTERS},
                "gateway": {name: self._gateway[name] for name in GATEWAY_COUNTERS},
            }

    def reset(self) -> None:
        """Zero the call, webhook and pipeline counters (pending deliveries stay counted)."""
        with self._lock:
            self._calls.clear()
            self._webhooks.clear()
            self._pipeline.clear()
            self._gateway.clear()
