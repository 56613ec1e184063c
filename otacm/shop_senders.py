"""The shop's event senders of the worker role, built from the settings.

One thread per configured shop endpoint (:class:`orders.shop_delivery.EndpointSender`),
in every worker process: their claims share the deliveries out, and a slow or dead
endpoint holds only its own thread, never the worker's getOrder loop. In the worker role
rather than a role of its own, since a deployment already runs and watches workers, and
the senders need what a worker has (the database, the settings), not the venue.
"""

from __future__ import annotations

import datetime as dt
import threading

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from orders.shop_delivery import Endpoint, start_senders
from otacm.settings import Settings
from storage.engine import make_sessions
from storage.lease import new_owner


def shop_endpoints(settings: Settings) -> list[Endpoint]:
    """The configured shop endpoints as their senders need them."""
    return [
        Endpoint(e.name, e.url, tuple(s.get_secret_value() for s in e.secrets))
        for e in settings.shop_endpoints
    ]


def start_shop_senders(
    settings: Settings, engine: Engine, sessions: sessionmaker[Session], stop: threading.Event
) -> list[threading.Thread]:
    """Start a sender thread per shop endpoint, running until ``stop`` is set."""
    return start_senders(
        shop_endpoints(settings),
        sessions,
        make_sessions(engine, read_only=True),
        owner=new_owner(),
        stop=stop,
        horizon=dt.timedelta(days=settings.shop_retry_horizon_days),
        timeout=settings.shop_request_timeout,
    )
