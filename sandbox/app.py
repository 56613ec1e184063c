"""The sandbox's HTTP surface: the venue's API and the sandbox's own ``/_sandbox/`` endpoints.

Below ``/{tenant}/{environment}/{company}`` (the company written in the one form the
config's ``company_path_form`` names: ``%20``, ``%2520`` or ``+``) it serves the venue's
paths — createOrder (``POST /channelManager``, ``?sync=1`` issuing inside the call),
getOrder, confirmOrder, replaceOrder, deleteOrder, listOrdersByPartner and the webhook
subscription endpoints (``POST /webhook``, ``GET /webhooks`` and ``GET /webhook`` as
``webhook_list_paths`` allows, ``GET``/``DELETE /webhook/{id}``; each listed with its
``subscriptionState``) —
behind the API key (``x-np-api-key`` or ``Authorization: Bearer``), routed as the
venue's request processor does (:func:`dispatch`: fixed words case-blind, a trailing
``/`` ignored, the venue's 404, 403 and 400 for what no route serves). Every answer carries
``x-npr-version``, ``x-npr-duration`` and ``x-npr-request-id``; every error is the
venue's ``{"code", "message"}`` from one handler, and an unexpected failure is a 400
``generic_error`` as the venue's is. The gateway faults (429 and 503, with ``Retry-After``
when ``retryAfterSeconds`` is set; latency) strike before authentication; the lost
answer (``answerLostRate``/``answerLostCount``) strikes after the work is done, cutting
the connection instead of answering. Every call is counted by endpoint name and status.

The sandbox's own endpoints need no key and live only under ``/_sandbox/``:

- ``GET /_sandbox/config``: tenant, environment, company, apiKey, partners, catalog,
  and ``baseUrl`` (the API base on this server);
- ``GET /_sandbox/stats`` (``DELETE`` zeroes it): see :mod:`sandbox.stats`;
- ``GET``/``POST /_sandbox/faults``: read or change faults; fields in :mod:`sandbox.faults`;
- ``POST /_sandbox/tick``: run one pickup cycle now, answer what it did;
- ``POST /_sandbox/orders/{orderId}/reprocess``: a venue operator re-processes a
  Submitted or Error order (announced by webhook); answers the order;
- ``POST /_sandbox/webhooks/{id}/state``: ``{"subscriptionState": "Inactive"}`` (or
  ``"Active"``) sets a subscription's state; an inactive one gets no deliveries;
- ``GET``/``POST /_sandbox/clock``: the sandbox's time; ``{"advanceSeconds": N}`` moves it
  forward (the sweeper's hour in an instant);
- ``POST /_sandbox/restore``: simulate a restore of the venue's database: every order's
  ``rowVersion`` is renumbered 1..n in its current order and the counter reset to n, so
  later changes take versions below those a client has seen (a backwards change feed);
  answers ``{"orders": n, "rowVersion": n}``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Flask, Response, current_app, g, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from sandbox.config import SandboxConfig
from sandbox.errors import (
    Forbidden,
    InvalidRequest,
    ResourceNotFound,
    SandboxError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnsupportedHttpMethod,
    not_found,
)
from sandbox.orders import ZERO_GUID, describe_validation_error
from sandbox.requests import RequestLine
from sandbox.runtime import SandboxRuntime
from sandbox.state import ACTIVE, INACTIVE, SUBSCRIPTION_STATE, OrderRecord
from venue.models import (
    ORDER_PROCESSED_EVENT,
    OrderItem,
    OrderStatus,
    Subscription,
    SubscriptionRequest,
    Wallet,
)

logger = logging.getLogger(__name__)

api = Blueprint("venue", __name__, url_prefix="/<tenant>/<environment>")
admin = Blueprint("sandbox", __name__, url_prefix="/_sandbox")


def create_sandbox_app(
    config: SandboxConfig | None = None, *, runtime: SandboxRuntime | None = None
) -> Flask:
    """The sandbox as a Flask app.

    Args:
        config: the venue to simulate; the defaults when omitted.
        runtime: an existing runtime to serve (its config wins). Without one the app
            builds its own, which its creator must close: ``sandbox_runtime(app).close()``.
    """
    if runtime is None:
        runtime = SandboxRuntime(config or SandboxConfig())
    app = Flask(__name__)
    # The venue's router sees the path's segments as sent: no redirect for "//".
    app.url_map.merge_slashes = False
    app.extensions["sandbox"] = runtime
    app.register_blueprint(api)
    app.register_blueprint(admin)
    app.register_error_handler(SandboxError, _sandbox_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start_timer)
    app.after_request(_finish)
    return app


def sandbox_runtime(app: Flask) -> SandboxRuntime:
    """The runtime an app serves."""
    runtime: SandboxRuntime = app.extensions["sandbox"]
    return runtime


def _runtime() -> SandboxRuntime:
    return sandbox_runtime(current_app)


# --- responses and errors -------------------------------------------------------------


def json_response(payload: Any, status: int = 200) -> Response:
    """``payload`` as JSON; money (``Decimal``) as JSON numbers, as the venue sends it."""
    return Response(
        json.dumps(payload, default=_json_number), status=status, mimetype="application/json"
    )


def _json_number(value: Any) -> Any:
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        # A float only to carry the number into JSON text, and only when its shortest
        # repr is exactly the decimal (true of any price in cents); else the exact string.
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def error_response(status: int, code: str, message: str) -> Response:
    """The venue's error body ``{"code", "message"}``."""
    return json_response({"code": code, "message": message}, status)


def _sandbox_error(exc: SandboxError) -> Response:
    return error_response(exc.status, exc.code, exc.message)


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 405 and request.blueprint == api.name:
        # A method werkzeug does not route at all: the venue's answer to any method but
        # GET, POST, PUT, PATCH and DELETE (APIRequestProcessor ProcessRequest).
        return _sandbox_error(UnsupportedHttpMethod(request.method.upper()))
    code = "resource_not_found" if status == 404 else (exc.name or "error").lower()
    return error_response(status, code.replace(" ", "_"), exc.description or exc.name)


def _unexpected_error(exc: Exception) -> Response:
    # The venue answers an internal failure with 400 generic_error too.
    logger.exception("unexpected error in %s %s", request.method, request.path)
    return error_response(400, "generic_error", f"Unexpected error: {type(exc).__name__}")


def _start_timer() -> None:
    g.started = time.perf_counter()


LOSABLE_ANSWERS = frozenset(
    {"createOrder", "confirmOrder", "replaceOrder", "deleteOrder", "getOrder"}
)
"""The calls whose answer the ``answerLost`` fault may lose once they succeeded."""


def _finish(response: Response) -> Response:
    runtime = _runtime()
    elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    response.headers["x-npr-version"] = runtime.config.api_version
    response.headers["x-npr-duration"] = f"{elapsed_ms:.0f}"
    response.headers["x-npr-request-id"] = str(uuid.uuid4())
    if response.status_code in (429, 503) and g.get("retry_after") is not None:
        response.headers["Retry-After"] = str(g.retry_after)
    if request.blueprint == api.name and g.get("api_name"):
        runtime.stats.record_call(g.api_name, response.status_code)
        if (
            g.api_name in LOSABLE_ANSWERS
            and 200 <= response.status_code < 300
            and runtime.faults.lose_answer()
        ):
            return _lose_answer(runtime, response)
    return response


def _lose_answer(runtime: SandboxRuntime, response: Response) -> Response:
    """Cut the connection instead of answering: the work is done, the answer never comes.

    After ``answerLostAfterSeconds`` of silence the socket is shut down, so the client
    reads the end of the connection where the answer should be (or has timed out by
    then); werkzeug's write of the answer then fails, and it drops the connection.
    Served without werkzeug's socket (a test client), the answer is a gateway 504
    instead: no order in it either.
    """
    runtime.stats.gateway("answersLost")
    logger.info("fault: the answer to %s %s is lost", request.method, g.api_name)
    wait = runtime.faults.faults.answer_lost_after_seconds
    if wait:
        time.sleep(wait)
    connection = request.environ.get("werkzeug.socket")
    if not isinstance(connection, socket.socket):
        return error_response(504, "gateway_timeout", "The gateway timed out waiting")
    # OSError: the client hung up first; the answer is lost all the same.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    return response


def _body(*, venue: bool = False) -> Any:
    """The request's JSON body; ``None`` when there is none.

    Args:
        venue: read as the venue's request processor does (APIRequestProcessor
            ProcessRequest): a body that is not JSON is kept as a JSON string, so the
            handler answers it "Body must be a JSON object"; elsewhere it is a 400 saying
            the body is not JSON.

    Raises:
        InvalidRequest: the body is not JSON (outside the venue's handlers).
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if venue:
            return raw.decode("utf-8", errors="replace")
        raise InvalidRequest("The request body is not valid JSON") from None


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
    company = unquote(_runtime().config.company_path)
    if rest == company or rest.startswith(company + "/"):
        return company, _segments(rest[len(company) + 1 :].split("/"))
    first, _, after = rest.partition("/")
    return first, _segments(after.split("/"))


@api.before_request
def _gateway_and_auth() -> None:
    runtime = _runtime()
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


def _key_matches(expected: str) -> bool:
    supplied = request.headers.get("x-np-api-key")
    if supplied is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            supplied = token.strip()
    return supplied is not None and hmac.compare_digest(supplied.encode(), expected.encode())


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
    if _runtime().faults.faults.missing_permissions:
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


# --- orders ---------------------------------------------------------------------------


def _order_json(record: OrderRecord) -> dict[str, Any]:
    """An order as ChannelMgrOrderAgent BuildOrderResponseJson writes it.

    Every field is written (AppendOrderLine, AppendWallet, AppendTicket/AppendCoupon):
    empty text as ``""``, a shell's prices as ``0``, an unset date-time as JsonBuilder
    CreateJsonValue's ``Format(0DT, 0, 9)``, ``""``; only ``manifestUrl`` (order and
    wallet) is left out when empty, and ``componentSchedule`` is written only on package
    lines with schedule entries stored (AppendComponentScheduleArray: every entry, in the
    order sent, item numbers as Code). The status is its plain name (GetStatusAsText).
    """
    order = record.order
    wire: dict[str, Any] = {
        "orderId": order.order_id,
        "status": str(order.status),
        "statusMessage": order.status_message or "",
        "partnerId": order.partner_id,
        "sellToOrderReference": order.sell_to_order_reference,
        "buyFromOrderReference": order.buy_from_order_reference or "",
        "sellToEmail": order.sell_to_email or "",
        "sellToName": order.sell_to_name or "",
        "sellToLanguage": order.sell_to_language or "",
        "paymentReference": order.payment_reference or "",
        "receivedAt": _xml_datetime(order.received_at),
        "jobId": order.job_id or "",
    }
    if order.manifest_url:
        wire["manifestUrl"] = order.manifest_url
    requested = record.request.items
    wire["items"] = [
        _line_json(item, requested[index] if index < len(requested) else None)
        for index, item in enumerate(order.items)
    ]
    if _runtime().config.legacy_sync:
        # The older synchronous API's order answers have neither (Old Agent
        # BuildOrderResponseJson).
        wire.pop("buyFromOrderReference", None)
        wire.pop("statusMessage", None)
    return wire


def _line_json(item: OrderItem, requested: RequestLine | None) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "lineNo": item.line_no,
        "itemNumber": item.item_number,
        "description": item.description or "",
        "isPackage": item.is_package,
        "quantity": item.quantity,
        "visitDate": item.visit_date.isoformat() if item.visit_date else "",
        "visitTime": item.visit_time.strftime("%H:%M:%S") if item.visit_time else "",
        "sellToName": item.sell_to_name or "",
        "sellToEmail": item.sell_to_email or "",
        "sellToLanguage": item.sell_to_language or "",
    }
    schedule = requested.component_schedule if requested is not None else None
    if item.is_package and schedule:
        wire["componentSchedule"] = [
            {
                "itemNumber": entry.item_number.strip().upper(),
                "visitDate": entry.visit_date.isoformat(),
                "visitTime": entry.visit_time.strftime("%H:%M:%S"),
            }
            for entry in schedule
        ]
    wire["wallets"] = [_wallet_json(wallet) for wallet in item.wallets]
    return wire


def _wallet_json(wallet: Wallet) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "seqNo": wallet.seq_no,
        "walletId": wallet.wallet_id or ZERO_GUID,
        "walletReferenceNumber": wallet.wallet_reference_number or "",
        "externalReferenceNumber": wallet.external_reference_number or "",
        "name": wallet.name or "",
        "issuedAt": _xml_datetime(wallet.issued_at),
        "unitPriceExclVat": wallet.unit_price_excl_vat or Decimal(0),
        "unitPriceInclVat": wallet.unit_price_incl_vat or Decimal(0),
        "currencyCode": wallet.currency_code or "",
    }
    if wallet.manifest_url:
        wire["manifestUrl"] = wallet.manifest_url
    wire["assets"] = [
        {
            "id": asset.id or "",
            "type": asset.type or "",
            "assetId": asset.asset_id or "",
            "referenceNumber": asset.reference_number or "",
            "itemNumber": asset.item_number or "",
            "description": asset.description or "",
        }
        for asset in wallet.assets
    ]
    return wire


def _summary_json(record: OrderRecord, replication: bool) -> dict[str, Any]:
    """One summary as the venue's generic formatter writes it.

    ChannelMgrOrderAgent ``ListOrdersByPartner`` names the fields; APIRequest
    ``GetRecords`` adds ``id`` (the SystemId) and, with ``sync``, ``rowVersion``;
    ``AddFieldToJson`` writes each by its type: every field present, blank text and codes
    as ``""``, GUIDs lowercase, the status enum by its caption (``Processing...``; the
    single-order answers keep the plain name), date-times in XML format, the row version
    as text.
    """
    order = record.order
    wire: dict[str, Any] = {
        "orderId": order.order_id,
        "partnerId": order.partner_id,
        "sellToOrderReference": order.sell_to_order_reference,
        "buyFromOrderReference": order.buy_from_order_reference or "",
        "sellToEmail": order.sell_to_email or "",
        "sellToName": order.sell_to_name or "",
        "sellToLanguage": order.sell_to_language or "",
        "paymentReference": order.payment_reference or "",
        "status": order.status.caption,
        "statusMessage": order.status_message or "",
        "receivedAt": _xml_datetime(order.received_at),
        "jobId": order.job_id or "",
        "manifestUrl": order.manifest_url or "",
        "id": record.system_id,
    }
    if replication:
        wire["rowVersion"] = str(record.row_version)
    if _runtime().config.legacy_sync:
        wire.pop("buyFromOrderReference", None)
    return wire


def _xml_datetime(moment: dt.datetime | None) -> str:
    """A date-time as Format(..., 0, 9) writes it: UTC, ``Z``, fraction only when not zero."""
    if moment is None:
        return ""
    text = moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def _issued_in_call(record: OrderRecord) -> OrderRecord:
    """Issue now (``?sync=1`` or legacy mode); a failed issuance answers 400, order left Error.

    Raises:
        InvalidRequest: issuance failed; the message is the order's statusMessage.
    """
    runtime = _runtime()
    sync = request.args.get("sync", "").lower() in ("1", "true")
    if not (sync or runtime.config.legacy_sync):
        return record
    final = runtime.pipeline.process_now(record)
    if final.status is OrderStatus.ERROR:
        raise InvalidRequest(final.order.status_message or "The order could not be issued")
    return final


def create_order() -> Response:
    """createOrder: 201 with the order as Submitted (or issued, synchronously)."""
    record = _runtime().orders.create(_body(venue=True))
    return json_response(_order_json(_issued_in_call(record)), 201)


def get_order(order_id: str) -> Response:
    """getOrder: the full order."""
    return json_response(_order_json(_runtime().orders.get(order_id)))


def confirm_order(order_id: str) -> Response:
    """confirmOrder: Draft → Issued; a no-op on Issued."""
    return json_response(_order_json(_runtime().orders.confirm(order_id, _body(venue=True))))


def replace_order(order_id: str) -> Response:
    """replaceOrder: new contents for a Draft or Error order, back to Submitted."""
    record = _runtime().orders.replace(order_id, _body(venue=True))
    return json_response(_order_json(_issued_in_call(record)))


def delete_order(order_id: str) -> Response:
    """deleteOrder: Cancelled (kept) or removed, as the order's status decides."""
    return json_response(_order_json(_runtime().orders.delete(order_id)))


def list_orders(partner_id: str) -> Response:
    """listOrdersByPartner: one page of summaries, filtered, or the change feed."""
    page = _runtime().orders.list(partner_id, request.args.to_dict())
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
            "data": [_summary_json(r, page.replication) for r in page.records],
        }
    )


# --- webhook subscriptions ------------------------------------------------------------


def create_webhook() -> Response:
    """Subscribe a URL to an event; 201 with the subscription."""
    body = _body()
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
    runtime = _runtime()
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
    if _runtime().config.webhook_list_paths not in ("both", path):
        raise ResourceNotFound("API endpoint not found")
    return json_response({"value": [s.to_wire() for s in _runtime().store.subscriptions()]})


def get_webhook(subscription_id: str) -> Response:
    """One subscription."""
    subscription = _runtime().store.subscription(subscription_id)
    if subscription is None:
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    return json_response(subscription.to_wire())


def delete_webhook(subscription_id: str) -> Response:
    """Remove a subscription; answers with the subscription removed."""
    store = _runtime().store
    subscription = store.subscription(subscription_id)
    if subscription is None or not store.remove_subscription(subscription_id):
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    logger.info("webhook subscription %s deleted", subscription.id)
    return json_response(subscription.to_wire())


# --- the sandbox's own endpoints ------------------------------------------------------


@admin.get("/config")
def show_config() -> Response:
    """What a client needs to configure itself against this sandbox."""
    config = _runtime().config
    base_path = f"/{config.tenant}/{config.environment}/{config.company_path}"
    return json_response(
        {**config.public_json(), "baseUrl": request.host_url.rstrip("/") + base_path}
    )


@admin.get("/stats")
def show_stats() -> Response:
    """The call, webhook and pipeline counters."""
    return json_response(_runtime().stats.snapshot())


@admin.delete("/stats")
def reset_stats() -> Response:
    """Zero the counters."""
    runtime = _runtime()
    runtime.stats.reset()
    return json_response(runtime.stats.snapshot())


@admin.get("/faults")
def show_faults() -> Response:
    """The faults in force."""
    return json_response(_runtime().faults.faults.to_json())


@admin.post("/faults")
def set_faults() -> Response:
    """Change some faults (fields in :mod:`sandbox.faults`); answers all now in force."""
    body = _body()
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object of faults")
    try:
        faults = _runtime().faults.update(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
    logger.info("faults changed: %s", ", ".join(sorted(body)))
    return json_response(faults.to_json())


@admin.post("/webhooks/<subscription_id>/state")
def set_subscription_state(subscription_id: str) -> Response:
    """Set a subscription's state: ``{"subscriptionState": "Inactive"}`` stops its
    deliveries, as Business Central does after repeated 4xx answers; ``Active`` resumes."""
    body = _body()
    state = body.get(SUBSCRIPTION_STATE) if isinstance(body, dict) else None
    if state not in (ACTIVE, INACTIVE):
        raise InvalidRequest(f"{SUBSCRIPTION_STATE} must be '{ACTIVE}' or '{INACTIVE}'")
    subscription = _runtime().store.set_subscription_state(subscription_id, state)
    if subscription is None:
        raise ResourceNotFound(f"Subscription '{subscription_id}' was not found")
    logger.info("webhook subscription %s set %s", subscription.id, state)
    return json_response(subscription.to_wire())


@admin.post("/tick")
def tick() -> Response:
    """Run one pickup cycle now."""
    return json_response(_runtime().pipeline.run_cycle().to_json())


@admin.post("/orders/<order_id>/reprocess")
def reprocess_order(order_id: str) -> Response:
    """A venue operator re-processes a Submitted or Error order (CMJobQueueRunner
    ReProcessSingleOrder): it runs through issuance now and its outcome is announced by
    webhook; answers the order as getOrder shows it."""
    runtime = _runtime()
    runtime.orders.get(order_id)  # the venue's 400/404 for a bad or unknown id
    return json_response(_order_json(runtime.pipeline.reprocess(order_id)))


@admin.get("/clock")
def show_clock() -> Response:
    """The sandbox's time and how far it runs ahead of the real time."""
    return _clock_json()


@admin.post("/clock")
def advance_clock() -> Response:
    """Move the sandbox's time forward: ``{"advanceSeconds": N}``."""
    body = _body()
    seconds = body.get("advanceSeconds") if isinstance(body, dict) else None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise InvalidRequest("advanceSeconds must be a number of seconds, at least 0")
    _runtime().clock.advance(dt.timedelta(seconds=seconds))
    return _clock_json()


@admin.post("/restore")
def restore() -> Response:
    """Renumber every order's row version 1..n, as after a database restore."""
    count = _runtime().store.renumber_row_versions()
    logger.info("row versions renumbered 1..%d (simulated restore)", count)
    return json_response({"orders": count, "rowVersion": count})


def _clock_json() -> Response:
    clock = _runtime().clock
    return json_response(
        {
            "now": clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "offsetSeconds": clock.offset.total_seconds(),
        }
    )
