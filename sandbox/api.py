"""The venue's API as the sandbox serves it: addressing, the gateway, the key, the routes.

Below ``/{tenant}/{environment}/{company}`` (the company written in the one form the
config's ``company_path_form`` names: ``%20``, ``%2520`` or ``+``) it serves the venue's
paths — createOrder (``POST /channelManager``, ``?sync=1`` issuing inside the call),
getOrder, confirmOrder, replaceOrder, deleteOrder, listOrdersByPartner and the webhook
subscription endpoints (``POST /webhook``, ``GET /webhooks`` and ``GET /webhook`` as
``webhook_list_paths`` allows, ``GET``/``DELETE /webhook/{id}``; each listed with its
``subscriptionState``) — behind the API key (``x-np-api-key`` or ``Authorization:
Bearer``), routed as the venue's request processor does (:func:`dispatch`: fixed words
case-blind, a trailing ``/`` ignored, the venue's 404, 403 and 400 for what no route
serves). The gateway's limits per API identity (:mod:`sandbox.limits`: 429 with
``Retry-After`` beyond them) and its faults (429 and 503, with ``Retry-After`` when
``retryAfterSeconds`` is set; latency) strike before authentication. Orders are
answered as the venue writes them (:mod:`sandbox.wire`).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Response, g, request
from pydantic import ValidationError

from sandbox.config import SandboxConfig
from sandbox.errors import (
    Forbidden,
    InvalidRequest,
    ResourceNotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedHttpMethod,
    not_found,
)
from sandbox.limits import identity_label
from sandbox.orders import describe_validation_error
from sandbox.state import ACTIVE, SUBSCRIPTION_STATE, OrderRecord
from sandbox.web import current_runtime, json_response, request_body
from sandbox.wire import order_json, summary_json
from venue.models import OrderStatus
from venue.webhooks import ORDER_PROCESSED_EVENT, Subscription, SubscriptionRequest

logger = logging.getLogger(__name__)

api = Blueprint("venue", __name__, url_prefix="/<tenant>/<environment>")


# --- the venue's API: gateway, auth, addressing ---------------------------------------


@api.url_value_preprocessor
def _take_address(endpoint: str | None, values: dict[str, Any] | None) -> None:
    if values is not None:
        company, segments = _split_company(values.pop("rest", ""))
        g.address = (values.pop("tenant"), values.pop("environment"), company)
        g.segments = segments
        # Named before the gateway answers, so its 429/503 are counted by endpoint.
        _route(request.method.upper(), segments)


def _split_company(rest: str) -> tuple[str, list[str]]:
    """The company and the path's segments after it (the first empty one dropped).

    Read from the raw request URI where there is one, since a company such as "Demo
    Venue A/S" holds an escaped ``/`` that the decoded path no longer tells apart;
    otherwise the configured company, if the path starts with it, or the first segment.
    """
    raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw_uri:
        raw = urlsplit(raw_uri).path.split("/")
        if len(raw) > 3:
            return unquote(raw[3]), _segments([unquote(part) for part in raw[4:]])
    company = unquote(current_runtime().config.company_path)
    if rest == company or rest.startswith(company + "/"):
        return company, _segments(rest[len(company) + 1 :].split("/"))
    first, _, after = rest.partition("/")
    return first, _segments(after.split("/"))


@api.before_request
def _gateway_and_auth() -> None:
    runtime = current_runtime()
    # The gateway's limits per API identity come first: a refused call does no work.
    g.limit_identity = identity_label(_supplied_key())
    refused = runtime.limits.enter(g.limit_identity)
    if refused is not None:
        g.retry_after = refused
        raise TooManyRequests(f"Rate limit is exceeded. Try again in {refused} seconds.")
    faults = runtime.faults.faults
    if faults.latency_ms:
        time.sleep(faults.latency_ms / 1000)
    g.retry_after = faults.retry_after_seconds
    if runtime.faults.roll(faults.rate_429):
        raise TooManyRequests("Rate limit exceeded; slow down and retry later")
    if runtime.faults.roll(faults.rate_503):
        raise ServiceUnavailable("The request timed out in the queue; retry later")
    g.retry_after = None  # only the gateway's own 429 and 503 carry it
    if not _key_matches(runtime.config.api_key.get_secret_value()):
        raise Unauthorized("Missing or invalid API key (x-np-api-key)")
    tenant, environment, company = g.address
    config = runtime.config
    if tenant.lower() != config.tenant.lower():
        raise ResourceNotFound(f"Unknown tenant '{tenant}'")
    if environment.lower() != config.environment.lower():
        raise ResourceNotFound(f"Unknown environment '{environment}'")
    if not _company_matches(company, config):
        raise ResourceNotFound(f"Unknown company '{company}'")


# RFC 3986's unreserved characters: percent-escaping one of them changes nothing.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _company_matches(decoded: str, config: SandboxConfig) -> bool:
    """Whether the request wrote the company in the one form this venue answers.

    The segment is read from the raw request URI (werkzeug keeps it in ``RAW_URI``),
    because the decoded path no longer tells ``%20`` from ``%2520`` or ``+`` reliably;
    both sides are normalized as RFC 3986 allows (escapes in upper case, unreserved
    characters unescaped). Without a raw URI, the decoded segment is compared.
    """
    raw_uri = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if not raw_uri:
        return decoded == unquote(config.company_path)
    segments = urlsplit(raw_uri).path.split("/")
    return len(segments) > 3 and _normal(segments[3]) == _normal(config.company_path)


def _normal(segment: str) -> str:
    def one(escape: re.Match[str]) -> str:
        char = chr(int(escape.group(1), 16))
        return char if char in _UNRESERVED else escape.group(0).upper()

    return _ESCAPE.sub(one, segment)


def _supplied_key() -> str | None:
    supplied = request.headers.get("x-np-api-key")
    if supplied is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            supplied = token.strip()
    return supplied


def _key_matches(expected: str) -> bool:
    supplied = _supplied_key()
    return supplied is not None and hmac.compare_digest(supplied.encode(), expected.encode())


def leave_gateway(exc: BaseException | None) -> None:
    """The call is answered: it no longer counts in flight at the gateway."""
    identity = g.pop("limit_identity", None)
    if identity is not None:
        current_runtime().limits.leave(identity)


# --- routing (APIRequestProcessor ProcessRequest, ChannelMgrApi Handle) -------------

_API_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Every method werkzeug knows reaches the router, which answers the venue's way.
_ALL_METHODS = [*_API_METHODS, "HEAD", "OPTIONS", "TRACE", "CONNECT"]
MODULE = "channelManager"
PERMISSION_SET = "NPR API Channel Mgr"  # ChannelMgrModuleResolver GetRequiredPermissionSet


@api.route("/<path:rest>", methods=_ALL_METHODS, provide_automatic_options=False)
def dispatch() -> Response:
    """Route a call below the company as the venue does.

    The subscription endpoints (``/webhook``, ``/webhooks``; the gateway's, not in the
    vendor's source) first. Then APIRequestProcessor ProcessRequest: the path's first
    empty segment is dropped (a trailing ``/``); an unknown module is 404 "/seg/seg Not
    Found"; a missing permission set (the ``missingPermissions`` fault) 403; a method
    other than GET, POST, PUT, PATCH or DELETE 400 ``unsupported_http_method``. Then
    ChannelMgrApi Handle matches the routes in its order, fixed words case-blind
    (APIRequest Match), and answers anything else 404 "API endpoint not found Not Found".
    """
    segments: list[str] = g.segments
    route = _route(request.method.upper(), segments)
    if segments and segments[0] in ("webhook", "webhooks"):
        if route is None:
            raise not_found("API endpoint not found")
        return route[0](*route[1])
    if not segments:
        raise InvalidRequest("The path is empty.")
    if segments[0].lower() != MODULE.lower():
        raise not_found("".join(f"/{segment}" for segment in segments))
    if current_runtime().faults.faults.missing_permissions:
        raise Forbidden(f"Missing permissions: {PERMISSION_SET}")
    method = request.method.upper()
    if method not in _API_METHODS:
        raise UnsupportedHttpMethod(method)
    if route is None:
        raise not_found("API endpoint not found")
    return route[0](*route[1])


def _segments(segments: list[str]) -> list[str]:
    if "" in segments:
        segments.remove("")  # AL's List.Remove: the first occurrence only
    return segments


Route = tuple[Callable[..., Response], tuple[str, ...]]


def _route(method: str, segments: list[str]) -> Route | None:
    """The handler and its path arguments for a call, or ``None``; names it for the counters.

    ChannelMgrApi Handle's routes in its order, fixed words case-blind (APIRequest
    Match); then the gateway's subscription endpoints, as written.
    """
    words = [segment.lower() for segment in segments]
    count = len(words)
    found: tuple[str, Callable[..., Response], tuple[str, ...]] | None = None
    if count and words[0] == MODULE.lower():
        if method == "GET" and count == 3 and words[1] == "orders":
            found = ("listOrdersByPartner", list_orders, (segments[2],))
        elif method == "GET" and count == 2:
            found = ("getOrder", get_order, (segments[1],))
        elif method == "POST" and count == 3 and words[2] == "confirm":
            found = ("confirmOrder", confirm_order, (segments[1],))
        elif method == "POST" and count == 1:
            found = ("createOrder", create_order, ())
        elif method == "PUT" and count == 2:
            found = ("replaceOrder", replace_order, (segments[1],))
        elif method == "DELETE" and count == 2:
            found = ("deleteOrder", delete_order, (segments[1],))
    elif segments[:1] == ["webhook"] and count == 1 and method == "POST":
        found = ("createWebhook", create_webhook, ())
    elif segments[:1] == ["webhooks"] and count == 1 and method == "GET":
        found = ("listWebhooks", list_webhooks, ())
    elif segments[:1] == ["webhook"] and count == 1 and method == "GET":
        found = ("listWebhook", list_webhook, ())
    elif segments[:1] == ["webhook"] and count == 2 and method == "GET":
        found = ("getWebhook", get_webhook, (segments[1],))
    elif segments[:1] == ["webhook"] and count == 2 and method == "DELETE":
        found = ("deleteWebhook", delete_webhook, (segments[1],))
    if found is None:
        return None
    g.api_name = found[0]  # the endpoint's name in the call counters
    return found[1], found[2]


def _issued_in_call(record: OrderRecord) -> OrderRecord:
    """Issue now (``?sync=1`` or legacy mode); a failed issuance answers 400, order left Error.

    Raises:
        InvalidRequest: issuance failed; the message is the order's statusMessage.
    """
    runtime = current_runtime()
    sync = request.args.get("sync", "").lower() in ("1", "true")
    if not (sync or runtime.config.legacy_sync):
        return record
    final = runtime.pipeline.process_now(record)
    if final.status is OrderStatus.ERROR:
        raise InvalidRequest(final.order.status_message or "The order could not be issued")
    return final


def create_order() -> Response:
    """createOrder: 201 with the order as Submitted (or issued, synchronously)."""
    record = current_runtime().orders.create(request_body(venue=True))
    return json_response(order_json(_issued_in_call(record)), 201)


def get_order(order_id: str) -> Response:
    """getOrder: the full order."""
    return json_response(order_json(current_runtime().orders.get(order_id)))


def confirm_order(order_id: str) -> Response:
    """confirmOrder: Draft → Issued; a no-op on Issued."""
    return json_response(
        order_json(current_runtime().orders.confirm(order_id, request_body(venue=True)))
    )


def replace_order(order_id: str) -> Response:
    """replaceOrder: new contents for a Draft or Error order, back to Submitted."""
    record = current_runtime().orders.replace(order_id, request_body(venue=True))
    return json_response(order_json(_issued_in_call(record)))


def delete_order(order_id: str) -> Response:
    """deleteOrder: Cancelled (kept) or removed, as the order's status decides."""
    return json_response(order_json(current_runtime().orders.delete(order_id)))


def list_orders(partner_id: str) -> Response:
    """listOrdersByPartner: one page of summaries, filtered, or the change feed."""
    page = current_runtime().orders.list(partner_id, request.args.to_dict())
    next_url = ""
    if page.next_page_key:
        # As the venue does: the query values re-appended as they are, not encoded again.
        query = "&".join(p for p in (page.query_text, f"pageKey={page.next_page_key}") if p)
        next_url = f"{request.base_url}?{query}"
    return json_response(
        {
            "morePages": page.next_page_key is not None,
            "nextPageKey": page.next_page_key or "",
            "nextPageURL": next_url,
            "data": [summary_json(r, page.replication) for r in page.records],
        }
    )


# --- webhook subscriptions ------------------------------------------------------------


def create_webhook() -> Response:
    """Subscribe a URL to an event; 201 with the subscription."""
    body = request_body()
    try:
        wanted = SubscriptionRequest.model_validate(body if isinstance(body, dict) else {})
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    if wanted.event_name != ORDER_PROCESSED_EVENT:
        raise InvalidRequest(f"Unknown eventName '{wanted.event_name}'")
    url = urlsplit(wanted.notification_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InvalidRequest("notificationUrl must be an absolute http(s) URL")
    subscription = Subscription.model_validate(
        {
            "id": str(uuid.uuid4()),
            "notificationUrl": wanted.notification_url,
            "eventName": wanted.event_name,
            "clientState": wanted.client_state,
            SUBSCRIPTION_STATE: ACTIVE,
        }
    )
    runtime = current_runtime()
    runtime.store.add_subscription(subscription, runtime.clock.now())
    logger.info("webhook subscription %s created", subscription.id)
    if runtime.config.webhook_create_empty_body:
        # As Business Central's external event subscriptions may: find it by listing.
        return Response(status=201)
    return json_response(subscription.to_wire(), 201)


def list_webhooks() -> Response:
    """Every subscription, with its ``subscriptionState``, in Business Central's
    ``{"value": [...]}`` list shape."""
    return _subscription_list("webhooks")


def list_webhook() -> Response:
    """The same list at the path one vendor page shows."""
    return _subscription_list("webhook")


def _subscription_list(path: str) -> Response:
    if current_runtime().config.webhook_list_paths not in ("both", path):
        raise ResourceNotFound("API endpoint not found")
    return json_response({"value": [s.to_wire() for s in current_runtime().store.subscriptions()]})


def get_webhook(subscription_id: str) -> Response:
    """One subscription."""
    subscription = current_runtime().store.subscription(subscription_id)
    if subscription is None:
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    return json_response(subscription.to_wire())


def delete_webhook(subscription_id: str) -> Response:
    """Remove a subscription; answers with the subscription removed."""
    store = current_runtime().store
    subscription = store.subscription(subscription_id)
    if subscription is None or not store.remove_subscription(subscription_id):
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    logger.info("webhook subscription %s deleted", subscription.id)
    return json_response(subscription.to_wire())
