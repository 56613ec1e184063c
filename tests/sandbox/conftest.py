"""Fixtures for the sandbox's tests, one layer each: config → running sandbox → HTTP clients,
plus a webhook receiver on a real port.

Everything talks real HTTP to a :class:`SandboxServer` on ``127.0.0.1:0``; the automatic
pickup cadence is off (``pickup_interval=0``) so tests drive it with ``POST /_sandbox/tick``.
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sandbox import Faults, SandboxConfig, SandboxServer
from sandbox.config import DEFAULT_PARTNERS
from venue.webhooks import Notification, parse_notifications

PARTNER = DEFAULT_PARTNERS[0].id
OTHER_PARTNER = DEFAULT_PARTNERS[1].id
INACTIVE_PARTNER = DEFAULT_PARTNERS[2].id
CLIENT_STATE = "client-state-for-tests"
# One TLS context for every client: building one per client costs a tenth of a second.
TLS = ssl.create_default_context()


def future(days: int = 30) -> str:
    """A visit date ``days`` from now, as YYYY-MM-DD."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=days)).date().isoformat()


def line(item: str = "31001", quantity: int = 1, **extra: Any) -> dict[str, Any]:
    """One createOrder line."""
    return {
        "itemNumber": item,
        "visitDate": future(),
        "visitTime": "10:30:00",
        "quantity": quantity,
        **extra,
    }


def order_body(
    reference: str = "ORDER-1",
    *,
    payment: str | None = "PAY-1",
    items: list[dict[str, Any]] | None = None,
    partner: str = PARTNER,
) -> dict[str, Any]:
    """A valid createOrder body."""
    body: dict[str, Any] = {
        "partnerId": partner,
        "sellToOrderReference": reference,
        "sellToEmail": "guest@example.com",
        "sellToName": "Jane Doe",
        "sellToLanguage": "ENU",
        "items": items if items is not None else [line()],
    }
    if payment is not None:
        body["paymentReference"] = payment
    return body


def config_for_tests(**changes: Any) -> SandboxConfig:
    """A config for tests: no automatic pickup, fast webhook retries, seeded faults."""
    values: dict[str, Any] = {
        "pickup_interval": 0,
        "webhook_backoff": 0.01,
        "faults": Faults(seed=7),
    }
    return SandboxConfig(**{**values, **changes})


class Venue:
    """A running sandbox with an API client (keyed) and an admin client (``/_sandbox``)."""

    def __init__(self, server: SandboxServer, api: httpx.Client, admin: httpx.Client) -> None:
        self.server = server
        self.api = api
        self.admin = admin

    def create(self, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """createOrder, asserting 201; the order JSON."""
        response = self.api.post("/channelManager", json=body or order_body(**kwargs))
        assert response.status_code == 201, response.text
        return dict(response.json())

    def get(self, order_id: str) -> dict[str, Any]:
        """getOrder, asserting 200."""
        response = self.api.get(f"/channelManager/{order_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def tick(self) -> dict[str, Any]:
        """One pickup cycle through ``POST /_sandbox/tick``."""
        response = self.admin.post("/tick")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def faults(self, **changes: Any) -> dict[str, Any]:
        """Change faults through ``POST /_sandbox/faults``."""
        response = self.admin.post("/faults", json=changes)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def advance(self, seconds: float) -> None:
        """Move the sandbox's clock forward."""
        response = self.admin.post("/clock", json={"advanceSeconds": seconds})
        assert response.status_code == 200, response.text

    def stats(self) -> dict[str, Any]:
        """``GET /_sandbox/stats``."""
        return dict(self.admin.get("/stats").json())

    def settle_webhooks(self, timeout: float = 5.0) -> dict[str, Any]:
        """Poll the stats until no webhook is pending; the stats then."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["webhooks"]["pending"] == 0:
                return stats
            assert time.monotonic() < deadline, f"webhooks still pending: {stats['webhooks']}"
            time.sleep(0.02)

    def subscribe(self, url: str, client_state: str = CLIENT_STATE) -> dict[str, Any]:
        """Subscribe ``url`` to ``ota_cm_order_processed``."""
        response = self.api.post(
            "/webhook",
            json={
                "notificationUrl": url,
                "eventName": "ota_cm_order_processed",
                "clientState": client_state,
            },
        )
        assert response.status_code == 201, response.text
        return dict(response.json())


@contextmanager
def running(config: SandboxConfig) -> Iterator[Venue]:
    """A sandbox serving ``config`` with its two clients, all closed afterwards."""
    with (
        SandboxServer(config) as server,
        httpx.Client(
            base_url=server.base_url,
            headers={"x-np-api-key": server.api_key},
            timeout=10,
            verify=TLS,
        ) as api,
        httpx.Client(base_url=server.url + "/_sandbox", timeout=10, verify=TLS) as admin,
    ):
        yield Venue(server, api, admin)


@pytest.fixture
def venue() -> Iterator[Venue]:
    """A sandbox with the test config."""
    with running(config_for_tests()) as started:
        yield started


@pytest.fixture
def make_venue() -> Iterator[Callable[..., Venue]]:
    """Start sandboxes with config changes; all stopped at the end of the test."""
    with ExitStack() as stack:
        yield lambda **changes: stack.enter_context(running(config_for_tests(**changes)))


class Receiver:
    """A webhook endpoint on a real port that records every POST it gets.

    ``answers`` lists the statuses to answer, in order; once used up it answers 200.
    """

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.arrivals: list[float] = []
        self.answers: list[int] = []
        self._changed = threading.Condition()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Where to subscribe."""
        return f"http://127.0.0.1:{self._server.server_port}/hook"

    @Request.application  # type: ignore[arg-type]
    def _app(self, request: Request) -> Response:
        with self._changed:
            status = self.answers.pop(0) if self.answers else 200
            if status == 200:
                self.bodies.append(request.get_json())
                self.arrivals.append(time.monotonic())
            self._changed.notify_all()
        return Response("{}", status=status, mimetype="application/json")

    def notifications(self) -> list[Notification]:
        """Every notification received, in arrival order, from any envelope shape."""
        with self._changed:
            bodies = list(self.bodies)
        return [n for body in bodies for n in parse_notifications(body)]

    def wait_for_posts(self, count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until ``count`` POSTs have been answered 200; the bodies."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.bodies) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"got {len(self.bodies)} webhook POSTs, wanted {count}"
                self._changed.wait(remaining)
            return list(self.bodies)

    def start(self) -> None:
        """Serve on a thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running webhook receiver."""
    started = Receiver()
    started.start()
    yield started
    started.stop()
