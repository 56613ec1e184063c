"""The producers of ``bench/shop_events``: mirror changes committed in processes of their
own (spawned: the function must be importable by name, hence this module beside
``__main__``). One process commits at most about 1/(the upsert's cost) a second, the
interpreter's one core; several share the rate, as the worker and the webhooks' processes
do in production."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from orders.mirror import upsert_order
from orders.shop_events import deliver_to
from storage.engine import make_engine, make_sessions
from storage.models import ChangeSource, ensure_connection
from venue.models import Order

PARTNER = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


def order(n: int) -> Order:
    """A new order, Issued, with one line and one minted wallet."""
    return Order.model_validate(
        {
            "orderId": f"5f0c1d2e-3a4b-4c5d-8e9f-{n:012x}",
            "status": "Issued",
            "partnerId": PARTNER,
            "sellToOrderReference": f"BENCH-{n}",
            "buyFromOrderReference": f"CM-{n}",
            "receivedAt": "2026-12-07T09:30:00Z",
            "items": [
                {
                    "lineNo": 10000,
                    "itemNumber": "ADULT",
                    "description": "Adult admission",
                    "quantity": 1,
                    "visitDate": "2027-01-10",
                    "visitTime": "10:00:00",
                    "wallets": [
                        {
                            "seqNo": 1,
                            "walletId": f"9d8c7b6a-0000-4000-8000-{n:012x}",
                            "walletReferenceNumber": f"WR-{n}",
                            "externalReferenceNumber": f"EXT-{n}",
                            "unitPriceExclVat": "100.00",
                            "unitPriceInclVat": "125.00",
                            "currencyCode": "DKK",
                            "manifestUrl": f"https://manifest.example/w/{n}",
                            "assets": [],
                        }
                    ],
                }
            ],
        }
    )


def shop_sessions(engine: Engine) -> tuple[sessionmaker[Session], int]:
    """Sessions on ``engine`` that record the shop's events, and the bench connection's id."""
    sessions = make_sessions(engine)
    deliver_to(sessions, {"default": ["shop"]})
    with sessions.begin() as session:
        return sessions, ensure_connection(session, "default")


def commit(sessions: sessionmaker[Session], connection_id: int, n: int) -> float:
    """Mirror order ``n`` in a transaction of its own; when it committed (``monotonic``)."""
    with sessions.begin() as session:
        upsert_order(
            session,
            connection_id,
            order(n),
            source=ChangeSource.WEBHOOK,
            observed_at=dt.datetime.now(dt.UTC),
        )
    return time.monotonic()


def produce(url: str, numbers: range, start: float, rate: float, done: Any) -> None:
    """Commit order ``n`` of ``numbers`` at ``start + n / rate`` (``time.monotonic()``,
    the system-wide clock); put ``{orderId: commit's return}`` on ``done``."""
    engine = make_engine(url)
    sessions, connection_id = shop_sessions(engine)
    committed: dict[str, float] = {}
    try:
        for n in numbers:
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            committed[order(n).order_id] = commit(sessions, connection_id, n)
    finally:
        engine.dispose()
        done.put(committed)
