"""When a call to the venue is tried again: the retry policy and which failures it covers.

:class:`RetryPolicy` bounds the attempts and the backoff; :func:`retryable` takes every
transient failure (transport errors, 429, 503, 504), :func:`retryable_unsent` only those
that show the venue cannot have acted on the call (what createOrder may retry);
:func:`retry_after_seconds` reads a ``Retry-After`` header, which the client also records
in its throttle so that every caller of the key waits it out. The client
(:class:`venue.client.VenueClient`) runs the loop with stamina.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from dataclasses import dataclass

import httpx

from venue.errors import VenueUnavailable
from venue.throttle import HeldOff


@dataclass(frozen=True)
class RetryPolicy:
    """How long a call keeps trying when the venue is unavailable or rate-limits it.

    No new attempt starts once ``deadline`` seconds have passed since the first, so a
    call ends within roughly ``deadline + wait_max`` plus one request's timeout.
    """

    attempts: int = 6
    deadline: float = 60.0
    wait_initial: float = 1.0
    wait_max: float = 15.0
    wait_jitter: float = 1.0


def retryable(exc: Exception) -> bool:
    """Transport errors, 429, 503 and 504 (all :class:`VenueUnavailable`); nothing else."""
    return isinstance(exc, VenueUnavailable)


_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, HeldOff)
"""Failures raised before the request left: the venue cannot have seen it (a connection
never made, or a call held back by the venue's ``Retry-After``)."""


def retryable_unsent(exc: Exception) -> bool:
    """Only the failures that show the venue did not act on the call: the gateway's 429 and
    503 (refused before any work), a connection never made or a call held back by a
    ``Retry-After`` (:class:`~venue.throttle.HeldOff`). A read timeout, a reset
    or a 504 may come after the venue committed it."""
    if not isinstance(exc, VenueUnavailable):
        return False
    return exc.status in (429, 503) or isinstance(exc.__cause__, _NOT_SENT)


def retry_after_seconds(value: str | None, now: dt.datetime) -> float | None:
    """The seconds a ``Retry-After`` header asks for: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())
