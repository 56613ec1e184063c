"""The client tells an observer of every attempt: endpoint name, status, duration."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from venue.client import open_client
from venue.connection import VenueConnection
from venue.endpoints import endpoint_name
from venue.errors import VenueNotFound, VenueUnavailable
from venue.retry import RetryPolicy
from venue.throttle import Throttle

CONNECTION = VenueConnection(
    api_base_url="https://venue.test", tenant="t", company="c", api_key=SecretStr("k-observer")
)
NO_WAIT = RetryPolicy(attempts=3, deadline=5, wait_initial=0, wait_max=0, wait_jitter=0)


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/channelManager", "createOrder"),
        ("GET", "/channelManager/9c6b2f4e", "getOrder"),
        ("POST", "/channelManager/9c6b2f4e/confirm", "confirmOrder"),
        ("PUT", "/channelManager/9c6b2f4e", "replaceOrder"),
        ("DELETE", "/channelManager/9c6b2f4e", "deleteOrder"),
        ("GET", "/channelManager/orders/21e8c1d2", "listOrdersByPartner"),
        ("POST", "/webhook", "createWebhook"),
        ("GET", "/webhooks", "listWebhooks"),
        ("DELETE", "/webhook/abc", "deleteWebhook"),
        ("PATCH", "/channelManager", "other"),
    ],
)
def test_endpoint_names_never_carry_ids(method: str, path: str, name: str) -> None:
    """Each call is named as the API names it, so metric labels hold no order ids."""
    assert endpoint_name(method, path) == name


def test_every_attempt_is_observed_with_its_status() -> None:
    """A 503 then a 404: two observations of getOrder, with their statuses and durations."""
    answers = iter([httpx.Response(503), httpx.Response(404, json={"code": "resource_not_found"})])
    seen: list[tuple[str, int | None, float]] = []

    def observe(endpoint: str, status: int | None, seconds: float) -> None:
        seen.append((endpoint, status, seconds))

    transport = httpx.MockTransport(lambda request: next(answers))
    with (
        open_client(
            CONNECTION, transport=transport, retry=NO_WAIT, throttle=Throttle(), observer=observe
        ) as client,
        pytest.raises(VenueNotFound),
    ):
        client.get_order("9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8")
    assert [(endpoint, status) for endpoint, status, _ in seen] == [
        ("getOrder", 503),
        ("getOrder", 404),
    ]
    assert all(seconds >= 0 for _, _, seconds in seen)


def test_a_call_with_no_answer_is_observed_as_none() -> None:
    """Transport failures are observed with status None, once per attempt."""
    seen: list[int | None] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    transport = httpx.MockTransport(refuse)
    with (
        open_client(
            CONNECTION,
            transport=transport,
            retry=NO_WAIT,
            throttle=Throttle(),
            observer=lambda endpoint, status, seconds: seen.append(status),
        ) as client,
        pytest.raises(VenueUnavailable),
    ):
        client.list_subscriptions()
    assert seen == [None, None, None]
