"""The venue client against ``httpx.MockTransport``: requests, errors, paging, retries, limits.

A scripted handler plays the venue: it records every request and answers from a list, so
each test can assert what went over the wire (method, raw path, headers, query, body) and
how the client took the answer. No monkeypatching, no network, no real sleeping for
backoff (the retry policy waits zero seconds unless a test is about the deadline).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from tests.support.stack import serve_sandbox
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.errors import (
    VenueAuthError,
    VenueError,
    VenueForbidden,
    VenueInvalidId,
    VenueNotFound,
    VenueProtocolError,
    VenueRateLimited,
    VenueRejected,
    VenueUnavailable,
)
from venue.models import OrderRequest, OrderStatus
from venue.retry import RetryPolicy, retryable_unsent
from venue.throttle import Throttle, throttle_for

API_KEY = "key-0f1e2d3c4b5a"
TENANT = "01234567-89ab-cdef-0123-456789abcdef"
PARTNER = "21e8c1d2-3f4a-4c5b-9e6d-7f8a9b0c1d2e"
ORDER_ID = "9c6b2f4e-2b71-4d23-9d6a-a3b4c5d6e7f8"
BASE_PATH = f"/{TENANT}/production/CRONUS%20International%20Ltd."
CUSTOMER_NAME = "Jane Doe"
CUSTOMER_EMAIL = "guest@example.com"
MID_FLIGHT = "Order is mid-flight (status Processing); retry once it has settled"
DUPLICATE = (
    "Order with sellToOrderReference 'PARTNER-ORDER-2026-00042' already exists"
    f" for partner '{PARTNER}'"
)
FAST = RetryPolicy(attempts=4, deadline=30.0, wait_initial=0, wait_max=0, wait_jitter=0)
ONCE = RetryPolicy(attempts=1)

ORDER = {
    "orderId": ORDER_ID,
    "status": "Submitted",
    "statusMessage": "",
    "partnerId": PARTNER,
    "sellToOrderReference": "PARTNER-ORDER-2026-00042",
    "buyFromOrderReference": "CM-20260515093000-A1B2",
    "receivedAt": "2026-05-15T09:30:00Z",
    "sellToName": CUSTOMER_NAME,
    "sellToEmail": CUSTOMER_EMAIL,
    "items": [],
}
REQUEST = OrderRequest.model_validate(
    {
        "partnerId": PARTNER,
        "sellToOrderReference": "PARTNER-ORDER-2026-00042",
        "sellToEmail": CUSTOMER_EMAIL,
        "sellToName": CUSTOMER_NAME,
        "sellToLanguage": "ENU",
        "items": [
            {
                "itemNumber": "31001",
                "visitDate": "2026-06-01",
                "visitTime": "10:30:00",
                "quantity": 1,
                "wallet": {"names": [CUSTOMER_NAME], "externalReferenceNumbers": ["JD-1"]},
            }
        ],
    }
)


def connection(
    company: str = "CRONUS International Ltd.",
    api_version: str | None = "2026-05-01",
    api_key: str = API_KEY,
) -> VenueConnection:
    return VenueConnection(
        tenant=TENANT,
        company=company,
        api_key=SecretStr(api_key),
        api_version=api_version,
        partner_ids=[PARTNER],
    )


def listed_order_id(number: int) -> str:
    """The orderId of :func:`summary` ``number``: a GUID, as the venue writes one."""
    return f"00000000-0000-4000-8000-{number:012d}"


def summary(number: int, **extra: Any) -> dict[str, Any]:
    return {
        "orderId": listed_order_id(number),
        "status": "Issued",
        "partnerId": PARTNER,
        "sellToOrderReference": f"REF-{number}",
        **extra,
    }


def reply(status: int = 200, body: Any = None, **headers: str) -> httpx.Response:
    content = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body)
    return httpx.Response(status, content=content, headers=headers)


def error(status: int, code: str, message: str) -> httpx.Response:
    return reply(status, {"code": code, "message": message})


class Venue:
    """A scripted venue: records each request and answers with the next scripted reply.

    The last reply repeats once the script runs out; an exception in the script is raised
    as the transport would raise it.
    """

    def __init__(self, *replies: httpx.Response | Exception) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


MakeClient = Callable[..., VenueClient]


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Clients over MockTransport with a private, generous throttle; closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(
            venue: Callable[[httpx.Request], httpx.Response],
            *,
            venue_connection: VenueConnection | None = None,
            retry: RetryPolicy = FAST,
            throttle: Throttle | None = None,
        ) -> VenueClient:
            http = stack.enter_context(httpx.Client(transport=httpx.MockTransport(venue)))
            return VenueClient(
                http,
                venue_connection or connection(),
                throttle=throttle or Throttle(rate=10_000),
                retry=retry,
            )

        yield make


def query(request: httpx.Request) -> dict[str, str]:
    return dict(request.url.params)


# --- endpoints --------------------------------------------------------------------------


def test_create_order_posts_the_request(make_client: MakeClient) -> None:
    """createOrder is POST /channelManager with key, pin, Accept and the camelCase body."""
    venue = Venue(reply(201, ORDER))

    order = make_client(venue).create_order(REQUEST)

    request = venue.last
    assert request.method == "POST"
    assert request.url.raw_path == f"{BASE_PATH}/channelManager".encode()
    assert request.headers["x-np-api-key"] == API_KEY
    assert request.headers["x-api-version"] == "2026-05-01"
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == REQUEST.to_wire()
    assert query(request) == {}
    assert (order.order_id, order.status) == (ORDER_ID, OrderStatus.SUBMITTED)
    assert order.buy_from_order_reference == "CM-20260515093000-A1B2"


def test_create_order_sync_adds_the_query_flag(make_client: MakeClient) -> None:
    """create_order(sync=True) sends ?sync=1 and accepts an already settled order."""
    venue = Venue(reply(201, {**ORDER, "status": "Issued"}))

    order = make_client(venue).create_order(REQUEST, sync=True)

    assert query(venue.last) == {"sync": "1"}
    assert order.status is OrderStatus.ISSUED


def test_get_order(make_client: MakeClient) -> None:
    """getOrder is GET /channelManager/{orderId} without a body."""
    venue = Venue(reply(200, ORDER))

    order = make_client(venue).get_order(ORDER_ID)

    assert venue.last.method == "GET"
    assert venue.last.url.raw_path == f"{BASE_PATH}/channelManager/{ORDER_ID}".encode()
    assert venue.last.content == b""
    assert order.order_id == ORDER_ID


def test_an_id_that_is_not_a_guid_is_refused_before_sending(make_client: MakeClient) -> None:
    """An order or partner id that is not a GUID would get 400 "Invalid order id" /
    "Invalid partnerId" (ChannelMgrOrderAgent TryGetOrderIdFromPath, ListOrdersByPartner):
    nothing is sent, and the error names the id ('/' or '?' cannot reach another path)."""
    venue = Venue(reply(200, ORDER))
    client = make_client(venue)
    calls: list[Callable[[], object]] = [
        lambda: client.get_order("a/b?c"),
        lambda: client.confirm_order("a/b?c", "PAY"),
        lambda: client.replace_order("a/b?c", REQUEST),
        lambda: client.delete_order("a/b?c"),
    ]
    for call in calls:
        with pytest.raises(VenueInvalidId) as caught:
            call()
        assert (caught.value.kind, caught.value.value, caught.value.status) == (
            "order id",
            "a/b?c",
            None,
        )
        assert "order id 'a/b?c' is not a GUID" in str(caught.value)
        assert not caught.value.may_be_transient
    with pytest.raises(VenueInvalidId, match="partnerId 'partner-1' is not a GUID"):
        client.list_orders("partner-1")
    with pytest.raises(VenueInvalidId, match="partnerId 'partner-1' is not a GUID"):
        list(client.change_feed("partner-1", None))
    assert venue.requests == []


def test_ids_are_sent_as_the_venue_writes_them(make_client: MakeClient) -> None:
    """A GUID in braces or upper case is sent lowercase without braces, the form the venue
    writes (ChannelMgrOrderAgent BuildOrderResponseJson ``Format(..., 0, 4).ToLower()``)."""
    venue = Venue(reply(200, ORDER), reply(200, []))
    client = make_client(venue)

    client.get_order("{" + ORDER_ID.upper() + "}")
    list(client.list_orders(PARTNER.upper().replace("-", "")))

    assert venue.requests[0].url.raw_path == f"{BASE_PATH}/channelManager/{ORDER_ID}".encode()
    assert venue.requests[1].url.raw_path.startswith(
        f"{BASE_PATH}/channelManager/orders/{PARTNER}".encode()
    )


@pytest.mark.parametrize(
    ("message", "path", "kind"),
    [
        ("Invalid order id", f"/channelManager/{ORDER_ID}", "order id"),
        ("Invalid partnerId", f"/channelManager/orders/{PARTNER}", "partnerId"),
    ],
)
def test_the_venues_invalid_id_answer_names_the_id(
    make_client: MakeClient, message: str, path: str, kind: str
) -> None:
    """Should the venue still answer 400 "Invalid order id" / "Invalid partnerId", the
    error says which id it refused, and is not transient (ChannelMgrOrderAgent
    TryGetOrderIdFromPath, ListOrdersByPartner)."""
    venue = Venue(error(400, "generic_error", message))
    client = make_client(venue)
    with pytest.raises(VenueInvalidId) as caught:
        if kind == "order id":
            client.get_order(ORDER_ID)
        else:
            list(client.list_orders(PARTNER))
    value = ORDER_ID if kind == "order id" else PARTNER
    assert (caught.value.kind, caught.value.value, caught.value.status) == (kind, value, 400)
    assert f"{path}: HTTP 400: generic_error: {message}: {kind} '{value}' is not a GUID" in str(
        caught.value
    )
    assert isinstance(caught.value, VenueRejected) and not caught.value.may_be_transient


def test_confirm_order(make_client: MakeClient) -> None:
    """confirmOrder is POST /channelManager/{orderId}/confirm with the payment reference."""
    venue = Venue(reply(200, {**ORDER, "status": "Issued"}))

    order = make_client(venue).confirm_order(ORDER_ID, "PAY-987654")

    assert venue.last.method == "POST"
    assert venue.last.url.raw_path == f"{BASE_PATH}/channelManager/{ORDER_ID}/confirm".encode()
    assert json.loads(venue.last.content) == {"paymentReference": "PAY-987654"}
    assert order.status is OrderStatus.ISSUED


def test_replace_order(make_client: MakeClient) -> None:
    """replaceOrder is PUT /channelManager/{orderId} with the whole request."""
    venue = Venue(reply(200, ORDER))

    order = make_client(venue).replace_order(ORDER_ID, REQUEST)

    assert venue.last.method == "PUT"
    assert venue.last.url.raw_path == f"{BASE_PATH}/channelManager/{ORDER_ID}".encode()
    assert json.loads(venue.last.content) == REQUEST.to_wire()
    assert order.status is OrderStatus.SUBMITTED


def test_delete_order_returns_the_cancelled_order(make_client: MakeClient) -> None:
    """deleteOrder is DELETE /channelManager/{orderId}; a body parses as the order."""
    venue = Venue(reply(200, {**ORDER, "status": "Cancelled"}))

    order = make_client(venue).delete_order(ORDER_ID)

    assert venue.last.method == "DELETE"
    assert venue.last.url.raw_path == f"{BASE_PATH}/channelManager/{ORDER_ID}".encode()
    assert order is not None and order.status is OrderStatus.CANCELLED


@pytest.mark.parametrize("status", [200, 204])
def test_delete_order_with_an_empty_body_returns_none(make_client: MakeClient, status: int) -> None:
    """A deleteOrder answer without a body (the row removed) is None, not a protocol error."""
    assert make_client(Venue(reply(status))).delete_order(ORDER_ID) is None


def test_list_orders_sends_every_filter(make_client: MakeClient) -> None:
    """Filters become status, sellToOrderReference (normalised), UTC Z times and pageSize."""
    venue = Venue(reply(200, [summary(1)]))
    copenhagen = dt.timezone(dt.timedelta(hours=2))

    orders = list(
        make_client(venue).list_orders(
            PARTNER,
            statuses=[OrderStatus.SUBMITTED, "Scheduled", OrderStatus.PROCESSING],
            sell_to_order_reference="  partner-order-1 ",
            received_from=dt.datetime(2026, 5, 1, 2, 0, tzinfo=copenhagen),
            received_to=dt.datetime(2026, 5, 31, 23, 59, 59, tzinfo=dt.UTC),
            page_size=500,
        )
    )

    assert venue.last.method == "GET"
    assert venue.last.url.raw_path.startswith(
        f"{BASE_PATH}/channelManager/orders/{PARTNER}?".encode()
    )
    assert query(venue.last) == {
        "status": "Submitted,Scheduled,Processing",
        "sellToOrderReference": "PARTNER-ORDER-1",
        "receivedAtFrom": "2026-05-01T00:00:00Z",
        "receivedAtTo": "2026-05-31T23:59:59Z",
        "pageSize": "500",
    }
    assert [o.order_id for o in orders] == [listed_order_id(1)]


def test_list_orders_refuses_naive_datetimes(make_client: MakeClient) -> None:
    """A naive bound is refused before any request: its meaning would be a guess."""
    venue = Venue(reply(200, []))

    with pytest.raises(ValueError, match="timezone-aware"):
        list(make_client(venue).list_orders(PARTNER, received_from=dt.datetime(2026, 5, 1)))
    assert venue.requests == []


def test_paging_follows_next_page_key_and_never_next_page_url(make_client: MakeClient) -> None:
    """Three pages are read by rebuilding the request with pageKey; nextPageURL is ignored."""
    trap = "https://elsewhere.invalid/trap?pageKey=WRONG"
    venue = Venue(
        reply(
            200,
            {
                "morePages": True,
                "nextPageKey": "k2",
                "nextPageURL": trap,
                "data": [summary(1), summary(2)],
            },
        ),
        reply(
            200, {"morePages": True, "nextPageKey": "k3", "nextPageURL": trap, "data": [summary(3)]}
        ),
        reply(
            200, {"morePages": False, "nextPageKey": "", "nextPageURL": trap, "data": [summary(4)]}
        ),
    )

    orders = list(make_client(venue).list_orders(PARTNER, statuses=["Issued"]))

    assert [o.order_id for o in orders] == [
        listed_order_id(1),
        listed_order_id(2),
        listed_order_id(3),
        listed_order_id(4),
    ]
    assert [r.url.host for r in venue.requests] == ["api.npretail.app"] * 3
    assert {r.url.path for r in venue.requests} == {
        f"/{TENANT}/production/CRONUS International Ltd./channelManager/orders/{PARTNER}"
    }
    assert [query(r) for r in venue.requests] == [
        {"status": "Issued"},
        {"status": "Issued", "pageKey": "k2"},
        {"status": "Issued", "pageKey": "k3"},
    ]


def test_paging_is_lazy(make_client: MakeClient) -> None:
    """Taking the first summary requests only the first page."""
    venue = Venue(
        reply(200, {"morePages": True, "nextPageKey": "k2", "data": [summary(1)]}),
        reply(200, {"morePages": False, "data": [summary(2)]}),
    )

    first = next(make_client(venue).list_orders(PARTNER))

    assert first.order_id == listed_order_id(1)
    assert len(venue.requests) == 1


def test_a_repeated_page_key_is_a_protocol_error(make_client: MakeClient) -> None:
    """A venue that hands back the same nextPageKey again cannot loop the client forever."""
    venue = Venue(reply(200, {"morePages": True, "nextPageKey": "same", "data": [summary(1)]}))

    with pytest.raises(VenueProtocolError, match="nextPageKey repeats"):
        list(make_client(venue).list_orders(PARTNER))
    assert len(venue.requests) == 2


def test_change_feed_asks_for_rows_after_the_high_water_mark(make_client: MakeClient) -> None:
    """The change feed sends sync=true and lastRowVersion, keeping both on every page."""
    venue = Venue(
        reply(200, {"morePages": True, "nextPageKey": "k2", "data": [summary(1, rowVersion=42)]}),
        reply(200, {"morePages": False, "data": [summary(2, rowVersion=43)]}),
    )

    rows = list(make_client(venue).change_feed(PARTNER, 41, page_size=1))

    assert [row.row_version for row in rows] == [42, 43]
    assert [query(r) for r in venue.requests] == [
        {"sync": "true", "lastRowVersion": "41", "pageSize": "1"},
        {"sync": "true", "lastRowVersion": "41", "pageSize": "1", "pageKey": "k2"},
    ]


def test_change_feed_from_the_beginning(make_client: MakeClient) -> None:
    """Without a high-water mark the feed sends sync=true alone."""
    venue = Venue(reply(200, []))

    assert list(make_client(venue).change_feed(PARTNER, None)) == []
    assert query(venue.last) == {"sync": "true"}


def test_find_by_reference_compares_case_blind(make_client: MakeClient) -> None:
    """find_by_reference asks for the normalised reference and keeps only exact matches."""
    venue = Venue(
        reply(
            200,
            [
                summary(1, sellToOrderReference="PARTNER-ORDER-7"),
                summary(2, sellToOrderReference="PARTNER-ORDER-70"),
            ],
        )
    )

    found = make_client(venue).find_by_reference(PARTNER, "partner-order-7")

    assert query(venue.last) == {"sellToOrderReference": "PARTNER-ORDER-7"}
    assert [o.order_id for o in found] == [listed_order_id(1)]


def test_create_subscription(make_client: MakeClient) -> None:
    """POST /webhook carries notificationUrl, eventName and the client state."""
    venue = Venue(reply(201, {"id": "sub-1", "notificationUrl": "https://ota.example/hook"}))

    subscription = make_client(venue).create_subscription(
        "https://ota.example/hook", SecretStr("state-123")
    )

    assert venue.last.method == "POST"
    assert venue.last.url.raw_path == f"{BASE_PATH}/webhook".encode()
    assert json.loads(venue.last.content) == {
        "notificationUrl": "https://ota.example/hook",
        "eventName": "ota_cm_order_processed",
        "clientState": "state-123",
    }
    assert subscription is not None and subscription.id == "sub-1"


@pytest.mark.parametrize("body", [b"", b"  \n"])
def test_create_subscription_with_an_empty_answer_returns_none(
    make_client: MakeClient, body: bytes
) -> None:
    """201 with no body (Business Central's external event subscriptions may answer so)
    is None, not a protocol error: the caller finds the subscription by listing."""
    venue = Venue(reply(201, body))
    assert make_client(venue).create_subscription("https://ota.example/hook", "s") is None


def test_list_subscriptions_falls_back_to_webhook_and_remembers(make_client: MakeClient) -> None:
    """GET /webhooks answered 404: GET /webhook is tried, and asked first from then on
    (the vendor's pages name both; ``spec/WEBHOOKS.md``)."""
    not_found = error(404, "resource_not_found", "API endpoint not found")
    listed = reply(200, {"value": [{"id": "s1"}]})
    venue = Venue(not_found, listed, listed, listed)
    client = make_client(venue)

    assert [s.id for s in client.list_subscriptions()] == ["s1"]
    assert [s.id for s in client.list_subscriptions()] == ["s1"]

    paths = [r.url.raw_path.decode().removeprefix(BASE_PATH) for r in venue.requests]
    assert paths == ["/webhooks", "/webhook", "/webhook"]


def test_list_subscriptions_when_neither_path_answers(make_client: MakeClient) -> None:
    """Both list paths 404: the second answer is the error."""
    venue = Venue(error(404, "resource_not_found", "API endpoint not found"))
    with pytest.raises(VenueNotFound, match="GET /webhook: HTTP 404"):
        make_client(venue).list_subscriptions()
    assert len(venue.requests) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"morePages": False, "data": [{"id": "s1"}, {"id": "s2"}]},
        {"value": [{"id": "s1"}, {"id": "s2"}]},
        [{"id": "s1"}, {"id": "s2"}],
    ],
    ids=["page", "value", "bare"],
)
def test_list_subscriptions_accepts_every_list_shape(make_client: MakeClient, body: Any) -> None:
    """GET /webhooks parses as a page envelope, an OData value list or a bare array."""
    venue = Venue(reply(200, body))

    subscriptions = make_client(venue).list_subscriptions()

    assert venue.last.url.raw_path == f"{BASE_PATH}/webhooks".encode()
    assert [s.id for s in subscriptions] == ["s1", "s2"]


def test_delete_subscription(make_client: MakeClient) -> None:
    """DELETE /webhook/{id} removes a subscription."""
    venue = Venue(reply(204))

    make_client(venue).delete_subscription("sub-1")

    assert venue.last.method == "DELETE"
    assert venue.last.url.raw_path == f"{BASE_PATH}/webhook/sub-1".encode()


# --- addressing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "company",
    [
        "CRONUS International Ltd.",
        "CRONUS%20International%20Ltd.",
        "CRONUS%2520International%2520Ltd.",
    ],
    ids=["raw", "encoded-once", "encoded-twice"],
)
def test_company_is_encoded_exactly_once(make_client: MakeClient, company: str) -> None:
    """However the company is configured, the wire path carries it encoded once."""
    venue = Venue(reply(200, ORDER))

    make_client(venue, venue_connection=connection(company=company)).get_order(ORDER_ID)

    raw_path = venue.last.url.raw_path
    assert b"/CRONUS%20International%20Ltd./channelManager/" in raw_path
    assert b"%25" not in raw_path


def test_without_a_version_pin_no_version_header_is_sent(make_client: MakeClient) -> None:
    """An unpinned connection sends no x-api-version (the venue then answers with latest)."""
    venue = Venue(reply(200, ORDER))

    make_client(venue, venue_connection=connection(api_version=None)).get_order(ORDER_ID)

    assert "x-api-version" not in venue.last.headers
    assert venue.last.headers["x-np-api-key"] == API_KEY


def test_open_client_owns_its_http_client() -> None:
    """open_client builds a working client on the given transport and closes it on exit."""
    venue = Venue(reply(200, ORDER))

    with open_client(connection(), transport=httpx.MockTransport(venue), retry=ONCE) as client:
        assert client.get_order(ORDER_ID).order_id == ORDER_ID

    assert len(venue.requests) == 1
    assert API_KEY not in repr(client)


# --- errors -----------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param(
        error(400, "generic_error", "Unknown item '99999'"), VenueRejected, id="400-generic"
    ),
    pytest.param(
        error(400, "generic_error", MID_FLIGHT),
        VenueRejected,
        id="400-mid-flight",
    ),
    pytest.param(
        error(400, "generic_error", DUPLICATE),
        VenueRejected,
        id="400-duplicate",
    ),
    pytest.param(error(401, "unauthorized", "Invalid API key"), VenueAuthError, id="401"),
    pytest.param(error(403, "forbidden", "Missing permission"), VenueForbidden, id="403"),
    pytest.param(error(404, "resource_not_found", "Order not found"), VenueNotFound, id="404"),
    pytest.param(error(429, "too_many_requests", "Queue full"), VenueRateLimited, id="429"),
    pytest.param(error(503, "service_unavailable", "Timed out"), VenueUnavailable, id="503"),
    pytest.param(error(504, "gateway_timeout", "Timed out"), VenueUnavailable, id="504"),
    pytest.param(error(500, "internal", "Boom"), VenueError, id="500"),
]


@pytest.mark.parametrize(("answer", "kind"), ERROR_CASES)
def test_every_error_shape_maps_to_its_exception(
    make_client: MakeClient, answer: httpx.Response, kind: type[VenueError]
) -> None:
    """Each status becomes its class, carrying method, path, status, code and message."""
    body = json.loads(answer.content)

    with pytest.raises(VenueError) as caught:
        make_client(Venue(answer), retry=ONCE).get_order(ORDER_ID)

    exc = caught.value
    assert type(exc) is kind
    assert (exc.method, exc.path) == ("GET", f"/channelManager/{ORDER_ID}")
    assert (exc.status, exc.code, exc.message) == (
        answer.status_code,
        body["code"],
        body["message"],
    )
    assert f"GET /channelManager/{ORDER_ID}" in str(exc)
    assert body["message"] in str(exc)
    assert API_KEY not in str(exc)


def test_rejections_say_whether_they_may_pass(make_client: MakeClient) -> None:
    """Only the mid-flight and internal-failure 400s are flagged as possibly transient."""
    client = make_client(
        Venue(
            error(400, "generic_error", MID_FLIGHT),
            error(400, "generic_error", "An unexpected error occurred while issuing the order"),
            error(400, "generic_error", "Order cannot be replaced in status Issued"),
        ),
        retry=ONCE,
    )
    flags = []
    for _ in range(3):
        with pytest.raises(VenueRejected) as caught:
            client.replace_order(ORDER_ID, REQUEST)
        flags.append((caught.value.may_be_transient, caught.value.is_duplicate_reference))

    assert flags == [(True, False), (True, False), (False, False)]


def test_duplicate_reference_is_recognised(make_client: MakeClient) -> None:
    """The sandbox's duplicate message is recognised case-blind, and nothing else is."""
    venue = Venue(
        error(400, "generic_error", DUPLICATE.replace("already exists", "ALREADY EXISTS")),
        error(400, "generic_error", "Unknown partnerId 'P'"),
    )
    client = make_client(venue, retry=ONCE)
    with pytest.raises(VenueRejected) as duplicate:
        client.create_order(REQUEST)
    with pytest.raises(VenueRejected) as other:
        client.create_order(REQUEST)

    assert duplicate.value.is_duplicate_reference
    assert not duplicate.value.may_be_transient
    assert not other.value.is_duplicate_reference


def test_an_error_without_the_venue_body_still_maps(make_client: MakeClient) -> None:
    """A gateway's HTML error page gives the status class with no code or message."""
    answer = reply(403, b"<html>Forbidden</html>")

    with pytest.raises(VenueForbidden) as caught:
        make_client(Venue(answer)).get_order(ORDER_ID)

    assert (caught.value.code, caught.value.message) == (None, None)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"status": "Issued", "sellToName": "Jane Doe"}', b"[]", b"null"],
    ids=["malformed", "missing-fields", "array", "null"],
)
def test_an_undocumented_body_is_a_protocol_error(make_client: MakeClient, content: bytes) -> None:
    """A 2xx body that is not an Order raises VenueProtocolError from the ValidationError."""
    with pytest.raises(VenueProtocolError) as caught:
        make_client(Venue(reply(200, content))).get_order(ORDER_ID)

    exc = caught.value
    assert exc.status == 200
    assert isinstance(exc.__cause__, ValidationError)
    assert "body does not parse as Order: " in str(exc)
    assert CUSTOMER_NAME not in str(exc)


def test_missing_fields_are_named_in_the_protocol_error(make_client: MakeClient) -> None:
    """The protocol error names the missing fields, so a support ticket can say what broke."""
    with pytest.raises(VenueProtocolError, match="orderId: Field required"):
        make_client(Venue(reply(200, {"status": "Issued"}))).get_order(ORDER_ID)


def test_an_undocumented_list_body_is_a_protocol_error(make_client: MakeClient) -> None:
    """Bad JSON or a page that is not a list page is a protocol error, not a crash."""
    client = make_client(Venue(reply(200, b"<html>"), reply(200, {"data": {"status": 1}})))

    with pytest.raises(VenueProtocolError, match="does not parse as OrderSummary: not JSON"):
        list(client.list_orders(PARTNER))
    with pytest.raises(VenueProtocolError, match="data: Input should be a valid list"):
        list(client.list_orders(PARTNER))


def test_a_summary_that_does_not_read_never_fails_its_page(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad row is logged by its ids and the fields at fault, never its values; the
    other rows of the page, and the next page, still read.

    Follows APIRequest GetRecords (one page of rows written field by field by
    AddFieldToJson): a row the client cannot read is the venue's data, not a broken page.
    """
    caplog.set_level(logging.WARNING, logger="venue.client")
    bad = summary(2, orderId=ORDER_ID, status="Shipped", rowVersion="17", sellToName=CUSTOMER_NAME)
    first = {"morePages": True, "nextPageKey": "k1", "data": [summary(1), bad]}
    second = {"data": [{"status": 1}, summary(3)]}
    client = make_client(Venue(reply(200, first), reply(200, second)))

    pages = list(client.change_feed_pages(PARTNER, None))

    assert [[s.order_id for s in page.data] for page in pages] == [
        [listed_order_id(1)],
        [listed_order_id(3)],
    ]
    [unreadable] = pages[0].unreadable
    assert (unreadable.index, unreadable.order_id, unreadable.row_version) == (1, ORDER_ID, 17)
    assert unreadable.problem.startswith("status: Input should be 'Submitted'")
    [nameless] = pages[1].unreadable
    assert (nameless.order_id, nameless.row_version) == (None, None)
    assert "orderId: Field required" in nameless.problem
    logged = [r.getMessage() for r in caplog.records if r.name == "venue.client"]
    assert len(logged) == 2
    assert f"row 1 does not read (orderId {ORDER_ID}, id -, rowVersion 17)" in logged[0]
    assert all(CUSTOMER_NAME not in line and "Shipped" not in line for line in logged)
    # Listing without the feed leaves the bad rows out the same way.
    lister = make_client(Venue(reply(200, second)))
    assert [s.order_id for s in lister.list_orders(PARTNER)] == [listed_order_id(3)]


def test_a_nul_character_in_an_answer_is_a_protocol_error_naming_the_field(
    make_client: MakeClient,
) -> None:
    """PostgreSQL's text refuses NUL: such an answer is refused here, the same on both databases."""
    item = {"lineNo": 1, "itemNumber": "31001", "description": "Castle\x00"}
    listed = [summary(1, statusMessage="\x00"), summary(2)]
    client = make_client(Venue(reply(200, {**ORDER, "items": [item]}), reply(200, listed)))

    with pytest.raises(VenueProtocolError) as caught:
        client.get_order(ORDER_ID)
    # In a list, such a row is unreadable like one that does not parse: the page goes on.
    [page] = client.change_feed_pages(PARTNER, None)
    assert [s.order_id for s in page.data] == [listed_order_id(2)]
    assert page.unreadable[0].problem == (
        "statusMessage: expected text without NUL characters or unpaired surrogates"
    )

    assert caught.value.status == 200
    assert caught.value.reason == (
        "Order body: items.0.description: "
        "expected text without NUL characters or unpaired surrogates"
    )
    assert CUSTOMER_NAME not in str(caught.value)


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul(make_client: MakeClient) -> None:
    """The cheap test for a NUL escape can be fooled by ``\\\\u0000``; the walk is not."""
    client = make_client(Venue(reply(200, {**ORDER, "statusMessage": "C:\\u0000"})))

    assert client.get_order(ORDER_ID).status_message == "C:\\u0000"


def test_an_unpaired_surrogate_in_a_list_is_a_protocol_error(make_client: MakeClient) -> None:
    """List pages use the same parser as single answers: a lone ``\\ud800`` is not JSON text."""
    body = (
        b'{"data": [{"orderId": "00000000-0000-4000-8000-000000000001", "status": "Issued",'
        b' "statusMessage": "\\ud800"}]}'
    )
    client = make_client(Venue(reply(200, body)))

    with pytest.raises(VenueProtocolError, match="does not parse as OrderSummary: not JSON"):
        list(client.list_orders(PARTNER))


# --- retries ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503, 504])
def test_transient_statuses_are_retried(make_client: MakeClient, status: int) -> None:
    """429, 503 and 504 are retried, and the call succeeds once the venue answers."""
    venue = Venue(reply(status), reply(status), reply(200, ORDER))

    order = make_client(venue).get_order(ORDER_ID)

    assert order.order_id == ORDER_ID
    assert len(venue.requests) == 3


def test_transport_errors_are_retried(make_client: MakeClient) -> None:
    """A connection error or read timeout is retried like a 503."""
    venue = Venue(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), reply(200, ORDER))

    order = make_client(venue).get_order(ORDER_ID)

    assert order.order_id == ORDER_ID
    assert len(venue.requests) == 3


def test_a_create_the_venue_cannot_have_seen_is_retried(make_client: MakeClient) -> None:
    """createOrder is retried after the gateway's 429 and 503 and a connection never
    made, with the same body."""
    venue = Venue(reply(429), reply(503), httpx.ConnectError("refused"), reply(201, ORDER))

    order = make_client(venue).create_order(REQUEST)

    assert order.order_id == ORDER_ID
    assert len(venue.requests) == 4
    assert json.loads(venue.requests[0].content) == json.loads(venue.requests[3].content)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ReadError("reset"),
        reply(504),
    ],
    ids=["read-timeout", "disconnected", "reset", "504"],
)
def test_a_create_that_may_have_landed_is_not_retried(
    make_client: MakeClient, failure: httpx.Response | Exception
) -> None:
    """A createOrder whose answer was lost may have been taken, and by a retry its order
    may be in Error, which the venue would delete to take the retry: the failure is
    raised after one request, for the caller to look the sale up."""
    venue = Venue(failure, reply(201, ORDER))

    with pytest.raises(VenueUnavailable):
        make_client(venue).create_order(REQUEST)

    assert len(venue.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [
        error(400, "generic_error", "Unknown item '1'"),
        error(400, "generic_error", MID_FLIGHT),
        error(404, "resource_not_found", "Order not found"),
        error(500, "internal", "Boom"),
    ],
    ids=["400", "400-mid-flight", "404", "500"],
)
def test_final_answers_are_not_retried(make_client: MakeClient, answer: httpx.Response) -> None:
    """400 (even a transient-looking one), 404 and 500 are final: one request only."""
    venue = Venue(answer, reply(200, ORDER))

    with pytest.raises(VenueError):
        make_client(venue).get_order(ORDER_ID)

    assert len(venue.requests) == 1


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (reply(503), VenueUnavailable),
        (reply(504), VenueUnavailable),
        (reply(429), VenueRateLimited),
        (httpx.ConnectError("refused"), VenueUnavailable),
    ],
    ids=["503", "504", "429", "connect-error"],
)
def test_exhausted_attempts_raise_the_last_failure(
    make_client: MakeClient, answer: httpx.Response | Exception, kind: type[VenueError]
) -> None:
    """After the policy's attempts the last transient failure is raised as VenueUnavailable."""
    venue = Venue(answer)

    with pytest.raises(VenueUnavailable) as caught:
        make_client(venue).get_order(ORDER_ID)

    assert type(caught.value) is kind
    assert len(venue.requests) == FAST.attempts
    if isinstance(answer, Exception):
        assert caught.value.__cause__ is answer
        assert caught.value.status is None


def test_the_deadline_ends_retries_before_the_attempts_do(make_client: MakeClient) -> None:
    """A venue that stays down is given up on at the deadline, not after 10000 attempts."""
    venue = Venue(reply(503))
    policy = RetryPolicy(
        attempts=10_000, deadline=0.05, wait_initial=0.01, wait_max=0.01, wait_jitter=0
    )

    with pytest.raises(VenueUnavailable):
        make_client(venue, retry=policy).get_order(ORDER_ID)

    assert 2 <= len(venue.requests) < 10_000


def test_each_retry_is_logged(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    """Every call is one line with status and attempt, and giving up is a warning."""
    caplog.set_level(logging.INFO, logger="venue.client")
    venue = Venue(reply(503, **{"x-npr-version": "26.5.1"}), httpx.ConnectError("refused"))
    policy = RetryPolicy(attempts=3, wait_initial=0, wait_max=0, wait_jitter=0)

    with pytest.raises(VenueUnavailable):
        make_client(venue, retry=policy).get_order(ORDER_ID)

    lines = [r.getMessage() for r in caplog.records if r.name == "venue.client"]
    path = f"/channelManager/{ORDER_ID}"
    assert lines[0].startswith(f"venue GET {path} -> 503 in ")
    assert "x-npr-version 26.5.1, attempt 1" in lines[0]
    assert lines[1].startswith(f"venue GET {path} failed: ConnectError after ")
    assert lines[1].endswith("(attempt 2)")
    assert lines[2].endswith("(attempt 3)")
    assert lines[3] == f"venue GET {path} gave up after 3 attempts (ConnectError)"


def test_nothing_logged_holds_the_key_or_customer_data(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, through calls, retries and errors, no record shows the key, a name or an e-mail."""
    caplog.set_level(logging.DEBUG)
    venue = Venue(
        reply(503),
        httpx.ConnectError("refused"),
        reply(201, ORDER),
        reply(200, [summary(1, sellToName=CUSTOMER_NAME, sellToEmail=CUSTOMER_EMAIL)]),
        error(400, "generic_error", "Order cannot be replaced in status Issued"),
        reply(200, {"orderId": ORDER_ID, "sellToName": CUSTOMER_NAME}),
    )
    client = make_client(venue)

    client.create_order(REQUEST)
    list(client.list_orders(PARTNER, sell_to_order_reference="PARTNER-ORDER-2026-00042"))
    with pytest.raises(VenueRejected):
        client.replace_order(ORDER_ID, REQUEST)
    with pytest.raises(VenueProtocolError):
        client.get_order(ORDER_ID)

    assert len(venue.requests) == 6
    assert caplog.records, "the calls should have been logged"
    for record in caplog.records:
        text = record.getMessage() + repr(vars(record))
        for secret in (API_KEY, CUSTOMER_NAME, CUSTOMER_EMAIL):
            assert secret not in text, record.getMessage()


# --- throttling -------------------------------------------------------------------------


def _concurrent_calls(make_client: MakeClient, throttle: Throttle, callers: int = 20) -> int:
    """Run ``callers`` threads' get_order at once; the most requests the venue saw at once.

    Each request stays in the venue until six are in flight together or a short while
    passed, so an unthrottled client is sure to show more than five.
    """
    lock = threading.Condition()
    in_flight = peak = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
            lock.notify_all()
            lock.wait_for(lambda: in_flight > 5, 0.05)
            in_flight -= 1
        return reply(200, ORDER)

    client = make_client(handler, throttle=throttle)
    start = threading.Barrier(callers)

    def call() -> None:
        start.wait()
        client.get_order(ORDER_ID)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return peak


def test_no_more_than_five_requests_are_in_flight(make_client: MakeClient) -> None:
    """Twenty threads on one identity never have more than five requests at the venue."""
    assert _concurrent_calls(make_client, Throttle(rate=10_000)) <= 5


def test_the_concurrency_check_can_fail(make_client: MakeClient) -> None:
    """Control: with a cap of twenty the same threads do exceed five at once."""
    assert _concurrent_calls(make_client, Throttle(max_in_flight=20, rate=10_000)) > 5


class FakeClock:
    """A clock that moves only when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_rate_stays_within_the_window(make_client: MakeClient) -> None:
    """Ten calls at three per second start so that no second window holds more than three."""
    clock = FakeClock()
    throttle = Throttle(rate=3, period=1.0, clock=clock.time, sleep=clock.sleep)
    started: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        started.append(clock.now)
        return reply(200, ORDER)

    client = make_client(handler, throttle=throttle)
    for _ in range(10):
        client.get_order(ORDER_ID)

    assert len(started) == 10
    assert all(later - earlier >= 1.0 for earlier, later in zip(started, started[3:], strict=False))
    assert started[-1] - started[0] >= 3.0
    assert started[:3] == [1000.0] * 3  # a burst within the rate is not delayed
    assert clock.sleeps


def test_clients_of_one_identity_share_one_throttle(make_client: MakeClient) -> None:
    """A client without its own throttle waits while its identity's five places are all held."""
    venue_connection = connection(api_key=f"key-{uuid.uuid4()}")
    shared = throttle_for(venue_connection.api_identity)
    assert throttle_for(venue_connection.api_identity) is shared
    assert throttle_for(connection(api_key=f"key-{uuid.uuid4()}").api_identity) is not shared
    reached = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        reached.set()
        return reply(200, ORDER)

    with (
        httpx.Client(transport=httpx.MockTransport(handler)) as http,
        contextlib.ExitStack() as held,
    ):
        client = VenueClient(http, venue_connection, retry=ONCE)
        for _ in range(shared.max_in_flight):
            held.enter_context(shared.slot())
        caller = threading.Thread(target=client.get_order, args=(ORDER_ID,))
        caller.start()
        assert not reached.wait(0.1)
        held.close()
        assert reached.wait(5)
        caller.join()


@pytest.mark.process
def test_importing_the_client_starts_nothing() -> None:
    """Importing venue.client creates no throttle and starts no thread."""
    probe = (
        "import threading, venue.client, venue.throttle;"
        "print(threading.active_count(), len(venue.throttle._registry))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["1", "0"]


# --- Retry-After ------------------------------------------------------------------------


class TimedVenue(Venue):
    """A scripted venue that also notes when each request came."""

    def __init__(self, *replies: httpx.Response | Exception) -> None:
        super().__init__(*replies)
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.monotonic())
        return super().__call__(request)


WAITING = RetryPolicy(attempts=4, deadline=30.0, wait_initial=0, wait_max=5.0, wait_jitter=0)
ONCE_ONLY = RetryPolicy(attempts=1, deadline=30.0, wait_initial=0, wait_max=5.0, wait_jitter=0)
"""Retries at once, unless the venue asks for a wait (of at most 5 s)."""


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_is_waited_out_before_the_retry(make_client: MakeClient, status: int) -> None:
    """The gateway asks for a second's patience: the retry comes no sooner, then succeeds."""
    venue = TimedVenue(reply(status, **{"Retry-After": "1"}), reply(200, ORDER))

    order = make_client(venue, retry=WAITING).get_order(ORDER_ID)

    assert order.order_id == ORDER_ID
    assert len(venue.times) == 2
    assert venue.times[1] - venue.times[0] >= 1.0


@pytest.mark.parametrize(
    "header",
    [
        "3600",
        (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).strftime("%a, %d %b %Y %H:%M:%S GMT"),
    ],
    ids=["seconds", "http-date"],
)
def test_a_retry_after_beyond_the_longest_wait_ends_the_retries(
    make_client: MakeClient, header: str
) -> None:
    """A wait longer than the policy allows is not cut short: the call gives up at once,
    saying how long the venue asked for, and the caller's own backoff takes over."""
    venue = Venue(reply(429, **{"Retry-After": header}), reply(200, ORDER))

    with pytest.raises(VenueRateLimited) as caught:
        make_client(venue, retry=WAITING).get_order(ORDER_ID)

    assert len(venue.requests) == 1
    assert caught.value.retry_after is not None and caught.value.retry_after > 3000


def test_a_retry_after_holds_every_client_of_the_throttle(make_client: MakeClient) -> None:
    """One client's 429 with Retry-After 3600: another client of the same throttle sends
    nothing, and says how long the venue asked every caller of the key to wait."""
    shared = Throttle(rate=10_000)
    first = Venue(reply(429, **{"Retry-After": "3600"}))
    second = Venue(reply(200, ORDER))

    with pytest.raises(VenueRateLimited):
        make_client(first, retry=WAITING, throttle=shared).get_order(ORDER_ID)
    with pytest.raises(VenueRateLimited) as held:
        make_client(second, retry=WAITING, throttle=shared).get_order(ORDER_ID)

    assert second.requests == []
    assert held.value.status is None
    assert held.value.retry_after is not None and 3500 < held.value.retry_after <= 3600
    assert retryable_unsent(held.value)  # not sent: a create may be tried again


def test_a_retry_after_within_the_longest_wait_holds_the_other_client_until_then(
    make_client: MakeClient,
) -> None:
    """A 429 asking for a second: the other client's call waits for it, then goes."""
    clock = FakeClock()
    shared = Throttle(rate=10_000, clock=clock.time, sleep=clock.sleep)
    with pytest.raises(VenueRateLimited):
        make_client(
            Venue(reply(429, **{"Retry-After": "1"})), retry=ONCE_ONLY, throttle=shared
        ).get_order(ORDER_ID)
    second = Venue(reply(200, ORDER))

    order = make_client(second, retry=ONCE_ONLY, throttle=shared).get_order(ORDER_ID)

    assert order.order_id == ORDER_ID
    assert clock.sleeps == [pytest.approx(1.0)]


def test_the_sandbox_gateways_retry_after_is_honoured() -> None:
    """Against the simulated venue's gateway (``retryAfterSeconds``): its 429 asks for a
    second, and the client's retry comes no sooner."""
    with serve_sandbox() as sandbox:
        sandbox.runtime.faults.update({"rate429": 1.0, "retryAfterSeconds": 1})
        attempts: list[tuple[int | None, float]] = []

        def observe(endpoint: str, status: int | None, seconds: float) -> None:
            attempts.append((status, time.monotonic()))
            if status == 429:  # the gateway lets the next call through
                sandbox.runtime.faults.update({"rate429": 0.0})

        connection = VenueConnection(
            api_base_url=sandbox.url,
            tenant=sandbox.config.tenant,
            environment=sandbox.config.environment,
            company=sandbox.config.company,
            api_key=sandbox.config.api_key,
            partner_ids=[PARTNER],
        )
        with open_client(connection, retry=WAITING, observer=observe) as client:
            orders = list(client.list_orders(PARTNER))

    assert orders == []
    [(first, at_first), (second, at_second)] = attempts
    assert (first, second) == (429, 200)
    assert at_second - at_first >= 1.0
