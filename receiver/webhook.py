"""The webhook view: ``POST /webhooks/ota-cm``, the venue's ``ota_cm_order_processed`` in.

A POST goes through a short checklist, each failure with its own answer
(:mod:`receiver.errors`), in this order:

0. until the database is reachable and migrated (so that each connection's row id is
   known) → 503 ``schema_not_current`` or ``database_unavailable``;
1. body larger than ``settings.webhook_max_bytes`` → 413 ``body_too_large`` (by its
   ``Content-Length`` before reading, and while reading a chunked body); a body that
   cannot be read (broken chunked encoding, cut short) → 400 ``unreadable_body``;
2. not declared as JSON → 415 ``unsupported_media_type``; not decodable as standard
   JSON (RFC 8259: no ``NaN`` or ``Infinity``, no number beyond a double's range, nor
   one of more digits than Python converts) → 400 ``invalid_json``;
3. none of the three envelope shapes (``{"value": [...]}``, ``{"values": [...]}``, a
   bare notification), or an ``ota_cm_order_processed`` payload without ``orderId``, or
   an event name or order id that no text column can take (a NUL character, which
   PostgreSQL refuses, or an unpaired surrogate from a ``\\ud800`` escape, which neither
   database can encode) → 400 ``invalid_notification``, naming the field
   (``value.0.clientState``). The reference and status are hints: one that cannot be
   stored leaves its column empty, and the payload keeps it (escaped);
4. a ``clientState`` that no venue connection is configured with → 401
   ``unknown_client_state``, and nothing of the POST is stored. Each state names its
   connection, so one POST may carry notifications of several connections;
5. otherwise every notification is stored in the inbox (:mod:`orders.inbox`) in one
   transaction, and only then the answer is 200 ``{"stored": n, "duplicates": m}``.
   A database that cannot take the write in ``settings.db_lock_timeout`` → 503
   ``database_unavailable``, so the venue retries; never a 4xx for our own trouble.

Notifications of other events and unknown fields are stored and acknowledged, not
refused. A ``validationToken`` query parameter (Business Central's handshake) is echoed
as plain text, on GET and POST. The body is decoded and validated once, and the rows
are plain dicts: this is the hot path. For the same reason a POST without a query string
is served by :class:`WebhookPosts`, WSGI middleware of the same app, without Flask's
dispatch; it answers exactly as the view (both call :func:`_answer`), which serves the
rest (the handshake, other methods).

Logs name order ids and statuses, never client states, company or user data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, InternalServerError, MethodNotAllowed
from werkzeug.wrappers import Request

from orders.inbox import (
    EVENT_NAME_MAX,
    REFERENCE_HINT_MAX,
    STATUS_HINT_MAX,
    NewInboxRow,
    StoreResult,
    hint,
    store_notifications,
)
from receiver.body import read_json_body
from receiver.context import Receiver, current_receiver
from receiver.errors import (
    DATABASE_UNAVAILABLE,
    DatabaseUnavailable,
    InvalidNotification,
    ReceiverError,
    UnknownClientState,
    UnreadableBody,
    describe_database_error,
    http_error_response,
)
from storage.models import GUID_CHARS, InboxSource
from storage.types import utcnow
from venue.text import UNSTORABLE_TEXT, storable_text
from venue.values import canonical_guid
from venue.webhooks import ORDER_PROCESSED_EVENT, Notification, parse_webhook_body

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger(__name__)

bp = Blueprint("webhook", __name__)

WEBHOOK_PATH = "/webhooks/ota-cm"


@bp.route(WEBHOOK_PATH, methods=["GET", "POST"])
def receive() -> Response:
    """Store the notifications of one webhook POST in the inbox (see the module docstring)."""
    token = request.args.get("validationToken")
    if token is not None:
        return _echo(token)
    if request.method != "POST":
        raise MethodNotAllowed(valid_methods=["POST"])
    return _answer(current_receiver(), request)


class WebhookPosts:
    """WSGI middleware: the venue's webhook POSTs, served without Flask's dispatch.

    A webhook POST is the receiver's busiest request, and Flask's own dispatch (request
    context, URL matching, hooks) costs about a fifth of it. This serves ``POST`` to
    :data:`WEBHOOK_PATH` without a query string straight from werkzeug's request, with
    the same checks, answers and metrics as the view (:func:`_answer`); every other
    request, a ``validationToken`` handshake included, goes on to the Flask app.
    :func:`receiver.create_app` installs it as the app's ``wsgi_app``.
    """

    def __init__(self, flask_wsgi_app: WSGIApplication, receiver: Receiver) -> None:
        self.flask_wsgi_app = flask_wsgi_app
        self.receiver = receiver

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Answer a webhook POST; hand anything else to Flask."""
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or environ.get("PATH_INFO") != WEBHOOK_PATH
            or environ.get("QUERY_STRING")
        ):
            return self.flask_wsgi_app(environ, start_response)
        try:
            response = _answer(self.receiver, Request(environ))
        except ReceiverError as exc:
            response = exc.response()
        except HTTPException as exc:  # a body cut short of its Content-Length
            response = http_error_response(exc)
        except Exception:
            # As Flask does for a view: logged with its traceback, answered 500.
            logger.exception("Exception on %s [POST]", WEBHOOK_PATH)
            response = http_error_response(InternalServerError())
        return response(environ, start_response)


def _answer(receiver: Receiver, request: Request) -> Response:
    """Store one webhook POST (:func:`_receive`), count it, and answer it.

    Raises:
        ReceiverError: the POST is refused; counted by its code.
        UnreadableBody: the body cannot be read; counted as ``unreadable_body``.
    """
    try:
        result = _receive(receiver, request)
    except ReceiverError as exc:
        receiver.metrics.webhook.rejected(exc.code)
        raise
    except UnreadableBody as exc:
        receiver.metrics.webhook.rejected(exc.error_code)
        raise
    receiver.metrics.webhook.stored.inc(result.stored)
    receiver.metrics.webhook.duplicate.inc(result.duplicates)
    # Two counts, encoded here: jsonify's provider costs more than the answer is worth on
    # the receiver's busiest path (about 7 µs a POST).
    answer = f'{{"stored":{result.stored:d},"duplicates":{result.duplicates:d}}}\n'
    return Response(answer, status=200, mimetype="application/json")


def _echo(token: str) -> Response:
    response = Response(token, status=200, mimetype="text/plain")
    # The token is the caller's text: never let a browser sniff it into HTML.
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _receive(receiver: Receiver, request: Request) -> StoreResult:
    # Nothing can be attributed to a connection (nor stored) until the database is
    # ready; until then every POST is a 503, which the venue retries.
    connection_ids = receiver.connection_ids()
    body = read_json_body(request, receiver.settings.webhook_max_bytes)
    rows = _inbox_rows(receiver, connection_ids, body, request.remote_addr)
    if not rows:
        return StoreResult(stored=0, duplicates=0, ids=())
    try:
        # One INSERT on a driver connection; on SQLite its transaction takes the write
        # lock ahead of bulk work (storage.sqlite_writes), waiting up to the lock timeout.
        result = store_notifications(receiver.engine, rows)
    except DATABASE_UNAVAILABLE as exc:
        reason = describe_database_error(exc)
        logger.warning("webhook not stored, database unavailable: %s", reason)
        raise DatabaseUnavailable(reason) from exc
    # DEBUG, not INFO: a line per POST is the busiest log otacm could write, and the
    # worker logs every order it mirrors at INFO, with the statuses notified and the
    # inbox rows it settled; the metrics count every notification stored.
    if logger.isEnabledFor(logging.DEBUG):
        orders = [f"{r['order_id']}={r['notified_status']}" for r in rows if r["order_id"]]
        logger.debug(
            "webhook stored %d, duplicates %d: %s",
            result.stored,
            result.duplicates,
            ", ".join(orders) or "no order notifications",
        )
    return result


def _inbox_rows(
    receiver: Receiver, connection_ids: dict[str, int], body: Any, remote_addr: str | None
) -> list[NewInboxRow]:
    """The inbox rows of a decoded webhook body, each attributed to its connection.

    Every notification is validated before any state is judged, so an invalid POST is
    a 400 whatever its states.

    Raises:
        InvalidNotification: the body is no envelope, or a notification is invalid.
        UnknownClientState: a notification's ``clientState`` is not configured.
    """
    try:
        parsed = parse_webhook_body(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        raise InvalidNotification(_dotted(error["loc"]), error["msg"]) from None
    notifications = parsed.notifications
    received_at = utcnow()
    rows: list[NewInboxRow] = []
    owners: dict[str, int | None] = {}  # clientState → connection id, for this POST
    unknown_state: str | None = None
    for index, (notification, wire) in enumerate(zip(notifications, parsed.received, strict=True)):
        where = parsed.where(index)
        order_id, reference, status = _order_fields(notification, where)
        state = notification.client_state
        if state not in owners:
            name = receiver.connection_for(state)
            owners[state] = None if name is None else connection_ids[name]
        connection_id = owners[state]
        if connection_id is None:
            unknown_state = unknown_state or f"{where}clientState"
            continue
        rows.append(
            {
                "connection_id": connection_id,
                "source": InboxSource.WEBHOOK,
                "event_name": notification.event_name,
                "order_id": order_id,
                "buy_from_order_reference": reference,
                "notified_status": status,
                "notified_at": notification.timestamp,
                "received_at": received_at,
                # As received, unknown fields too; stored without the secret clientState.
                "payload": wire,
            }
        )
    if unknown_state is not None:
        logger.warning(
            "webhook refused: unknown client state at %s (%d notification(s)) from %s",
            unknown_state,
            len(notifications),
            remote_addr,
        )
        raise UnknownClientState(unknown_state)
    return rows


def _order_fields(
    notification: Notification, where: str
) -> tuple[str | None, str | None, str | None]:
    """``(orderId, buyFromOrderReference, status)`` of an order notification, else Nones.

    Only orderId is required: the status is a hint (a status this code does not know
    yet must not cost the venue's subscription a 400), and so is the reference.

    Raises:
        InvalidNotification: the event name is too long, or an order notification has
            no usable orderId.
    """
    if len(notification.event_name) > EVENT_NAME_MAX:
        raise InvalidNotification(f"{where}eventName", f"at most {EVENT_NAME_MAX} characters")
    if not storable_text(notification.event_name):
        raise InvalidNotification(f"{where}eventName", UNSTORABLE_TEXT)
    if notification.event_name != ORDER_PROCESSED_EVENT:
        return None, None, None
    payload = notification.payload
    raw_order_id = payload.get("orderId")
    if not isinstance(raw_order_id, str) or not raw_order_id.strip("{} "):
        raise InvalidNotification(f"{where}payload.orderId", "an order id is required")
    # Kept as the order mirror keys it. An id that is no GUID is stored all the same; the
    # worker's getOrder for it is refused before any call.
    order_id = canonical_guid(raw_order_id)
    if len(order_id) > GUID_CHARS:
        raise InvalidNotification(f"{where}payload.orderId", f"at most {GUID_CHARS} characters")
    if not storable_text(order_id):
        raise InvalidNotification(f"{where}payload.orderId", UNSTORABLE_TEXT)
    reference = hint(payload.get("buyFromOrderReference"), REFERENCE_HINT_MAX)
    return order_id, reference, hint(payload.get("status"), STATUS_HINT_MAX)


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)
