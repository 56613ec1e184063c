"""The demo's shop endpoint: receives otacm's events, verifies each, counts them by type.

It plays the shop's side of events to the shop (README, "Events to the shop"): an HTTP
server on a free loopback port that checks every request's Standard Webhooks signature
with the ``standardwebhooks`` library and the secret the demo gave ``otacm serve``,
answers 204, and counts what it got by event type; a request that does not verify is
answered 401 and counted apart.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from storage.records import DeliveryState, ShopDelivery

SHOP_ENDPOINT_NAME = "demo-shop"


@dataclass
class DemoShop:
    """What the demo's shop endpoint received.

    Attributes:
        url: where otacm POSTs the events.
        secret: the Standard Webhooks secret both sides share.
        by_type: events verified, by type (a repeat of an event id counted once).
        unverified: requests whose signature did not verify.
    """

    url: str
    secret: str
    by_type: Counter[str] = field(default_factory=Counter)
    unverified: int = 0
    ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def environment(self) -> dict[str, str]:
        """The settings that make ``otacm serve`` send its events here."""
        return {
            "OTACM_SHOP_ENDPOINT_NAME": SHOP_ENDPOINT_NAME,
            "OTACM_SHOP_ENDPOINT_URL": self.url,
            "OTACM_SHOP_ENDPOINT_SECRETS": self.secret,
        }

    def lines(self) -> Iterator[str]:
        """What it got, as lines for a terminal."""
        total = sum(self.by_type.values())
        yield (
            f"the shop's endpoint received {total} events, each signature verified"
            f" ({self.unverified} refused):"
        )
        for event_type, count in sorted(self.by_type.items()):
            yield f"  {event_type:<24} {count}"


@contextmanager
def demo_shop() -> Iterator[DemoShop]:
    """The demo's shop endpoint, serving until the block ends."""
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    verifier = Webhook(secret)
    shop: DemoShop | None = None

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            assert shop is not None
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                event = verifier.verify(body, dict(self.headers.items()))
            except (WebhookVerificationError, json.JSONDecodeError):
                with shop.lock:
                    shop.unverified += 1
                self.send_response(401)
            else:
                with shop.lock:
                    if self.headers["webhook-id"] not in shop.ids:
                        shop.ids.add(self.headers["webhook-id"])
                        shop.by_type[str(event.get("type"))] += 1
                self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the demo prints the counts instead

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    shop = DemoShop(url=f"http://127.0.0.1:{server.server_address[1]}/otacm/events", secret=secret)
    thread = threading.Thread(target=server.serve_forever, name="demo-shop", daemon=True)
    thread.start()
    try:
        yield shop
    finally:
        server.shutdown()
        server.server_close()


def deliveries_settled(engine: sa.Engine) -> bool:
    """Whether every event's delivery is over (delivered or given up)."""
    with engine.connect() as connection:
        waiting = connection.scalar(
            sa.select(sa.func.count())
            .select_from(ShopDelivery)
            .where(ShopDelivery.state.in_([DeliveryState.PENDING, DeliveryState.LEASED]))
        )
    return waiting == 0 if isinstance(waiting, int) else False
