"""The venue's API endpoints: where each call goes, and the name it is known by.

The paths of the order calls carry ids in the venue's own GUID form (:func:`order_path`,
:func:`partner_path`; an id that is not a GUID is refused before anything is sent), every
other path segment percent-encoded (:func:`segment`); query times are written as the
venue documents them (:func:`query_time`). :func:`endpoint_name` names a call by the API's
endpoint (``getOrder``), never by its path, for the :data:`CallObserver` a client tells
of every attempt (metrics hang on it).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from urllib.parse import quote

from venue.errors import VenueInvalidId
from venue.values import parse_guid

SUBSCRIPTION_LIST_PATHS = ("/webhooks", "/webhook")
"""Where the subscriptions are listed, in the order tried: the vendor's webhook pages
show ``GET /webhooks``, one shows ``GET /webhook`` (``spec/WEBHOOKS.md``)."""


CallObserver = Callable[[str, int | None, float], None]
"""Told of every attempt: the endpoint's name, the HTTP status (``None`` when no answer
came) and the seconds it took. Metrics hang on it; it must not raise."""

_ENDPOINTS = (
    ("POST", re.compile(r"^/channelManager$"), "createOrder"),
    ("GET", re.compile(r"^/channelManager/orders/[^/]+$"), "listOrdersByPartner"),
    ("GET", re.compile(r"^/channelManager/[^/]+$"), "getOrder"),
    ("POST", re.compile(r"^/channelManager/[^/]+/confirm$"), "confirmOrder"),
    ("PUT", re.compile(r"^/channelManager/[^/]+$"), "replaceOrder"),
    ("DELETE", re.compile(r"^/channelManager/[^/]+$"), "deleteOrder"),
    ("POST", re.compile(r"^/webhook$"), "createWebhook"),
    ("GET", re.compile(r"^/webhooks?$"), "listWebhooks"),
    ("DELETE", re.compile(r"^/webhook/[^/]+$"), "deleteWebhook"),
)


def endpoint_name(method: str, path: str) -> str:
    """The API's name for a call (``getOrder``), never its path: ids stay out of labels."""
    for endpoint_method, pattern, name in _ENDPOINTS:
        if method == endpoint_method and pattern.match(path):
            return name
    return "other"


def segment(value: str) -> str:
    """One path segment, percent-encoded, so an id can never add or escape a path level."""
    return quote(value, safe="")


def order_path(method: str, order_id: str, suffix: str = "") -> str:
    """``/channelManager/{orderId}{suffix}``, the id in the venue's own GUID form.

    Raises:
        VenueInvalidId: ``order_id`` is not a GUID; the venue would answer 400 "Invalid
            order id" (ChannelMgrOrderAgent TryGetOrderIdFromPath), so nothing is sent.
    """
    guid = parse_guid(order_id)
    if guid is None:
        path = f"/channelManager/{segment(order_id)}{suffix}"
        raise VenueInvalidId(method, path, kind="order id", value=order_id)
    return f"/channelManager/{guid}{suffix}"


def partner_path(partner_id: str) -> str:
    """``/channelManager/orders/{partnerId}``, the id in the venue's own GUID form.

    Raises:
        VenueInvalidId: ``partner_id`` is not a GUID; the venue would answer 400 "Invalid
            partnerId" (ChannelMgrOrderAgent ListOrdersByPartner), so nothing is sent.
    """
    guid = parse_guid(partner_id)
    if guid is None:
        path = f"/channelManager/orders/{segment(partner_id)}"
        raise VenueInvalidId("GET", path, kind="partnerId", value=partner_id)
    return f"/channelManager/orders/{guid}"


def query_time(value: dt.datetime) -> str:
    """A query datetime as ISO 8601 UTC with ``Z``, as the venue documents."""
    if value.tzinfo is None:
        raise ValueError("query datetimes must be timezone-aware")
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
