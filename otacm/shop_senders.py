"""The shop's event senders of the worker role, built from the settings.

One thread per configured shop endpoint (:class:`orders.shop_delivery.EndpointSender`),
in every worker process: on PostgreSQL their claims share the deliveries out, on SQLite
one of them sends and the others stand by (:mod:`orders.shop_leases`); a slow or dead
endpoint holds only its own thread, never the worker's getOrder loop. A stopping worker
joins them before it closes the database, so their last answers are recorded. In the worker role
rather than a role of its own, since a deployment already runs and watches workers, and
the senders need what a worker has (the database, the settings), not the venue.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery import Endpoint, join_senders, start_senders
from otacm.settings import Settings
from storage.engine import make_sessions
from storage.lease import new_owner


def shop_endpoints(settings: Settings) -> list[Endpoint]:
    """The configured shop endpoints as their senders need them."""
    return [
        Endpoint(e.name, e.url, tuple(s.get_secret_value() for s in e.secrets))
        for e in settings.shop_endpoints
    ]


@contextmanager
def shop_senders(
    settings: Settings, engine: Engine, sessions: sessionmaker[Session], stop: threading.Event
) -> Iterator[list[threading.Thread]]:
    """A sender thread per shop endpoint, running until ``stop`` is set or the block ends.

    On the way out ``stop`` is set and the threads are joined (:func:`join_senders`), so
    they settle the POSTs they have in flight while the database is still open.
    """
    threads = start_senders(
        shop_endpoints(settings),
        sessions,
        make_sessions(engine, read_only=True),
        owner=new_owner(),
        stop=stop,
        horizon=dt.timedelta(days=settings.shop_retry_horizon_days),
        timeout=settings.shop_request_timeout,
    )
    try:
        yield threads
    finally:
        stop.set()
        join_senders(threads, timeout=settings.shop_request_timeout)
