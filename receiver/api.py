"""The shop's JSON API: ``POST /api/orders`` submits one order through otacm.

The :data:`api` blueprint owns the view; the work is :func:`orders.submit.submit_now`:
the sale and its createOrder are recorded first, then sent once at once. The body is the
venue's order request (``spec/API.md``) plus optional ``amount``, ``currency``,
``amountIncludesVat`` and ``connection`` (a connection name; by default the only one).
The answers:

- 201: the venue accepted the order (or already had it from an earlier attempt whose
  answer was lost); the body names it: ``orderId``, ``status`` (the venue's),
  ``buyFromOrderReference``, with ``outcome`` ``sent``;
- 200: this (partner, reference) was submitted and sent before; the body is the same,
  with ``outcome`` ``duplicate``: submitting again changes nothing;
- 202: recorded, but the venue could not take it now; the outbox retries it (``outcome``
  ``recorded``, ``message`` says why, ``nextAttemptAt`` when);
- 422 with the venue's ``code`` and ``message``: the venue refused the order; the sale
  stays recorded, its outbox row ``failed``;
- 401 ``not_authorized`` without ``Authorization: Bearer <token>`` naming one of the
  configured ``api_tokens`` (the API is closed while none is configured);
- 400 ``invalid_json``, 400 ``invalid_order`` naming the field (``items[0].quantity``),
  400 ``unknown_connection``, 413 ``body_too_large``, 415 ``unsupported_media_type``;
  503 while the database cannot take the write (nothing is sent then).

Errors have the receiver's one JSON shape (:mod:`receiver.errors`). The venue client
comes from ``app.extensions[CLIENT_FACTORY]`` — by default :func:`open_venue_client`, a
client of its own per request with short retries (the outbox retries later anyway) —
so tests can give the app another transport or retry policy.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import cast

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from spectree import Response as Answers

from orders.submission import (
    SubmissionBody,
    SubmissionError,
    check_connection,
    choose_connection,
    parse_submission,
)
from orders.submit import SUBMIT_NOW_RETRY, SubmitAnswer, SubmitStatus, submit_now
from receiver.body import read_json_body
from receiver.context import current_receiver
from receiver.errors import (
    NotAuthorized,
    ReceiverError,
    error_response,
)
from receiver.openapi import ErrorBody, spec
from storage.types import utcnow
from storage.venue_limits import shared_throttle
from venue.client import VenueClient, open_client
from venue.connection import VenueConnection
from venue.endpoints import CallObserver

logger = logging.getLogger(__name__)

api = Blueprint("api", __name__, url_prefix="/api")

CLIENT_FACTORY = "otacm.api.venue_client"
"""The key in ``app.extensions`` of the callable that opens a venue client for a request."""

VenueClientFactory = Callable[[VenueConnection, CallObserver], AbstractContextManager[VenueClient]]
"""Opens a venue client for one connection, reporting its calls to the observer; the
client is closed when the ``with`` block ends."""

_STATUS_CODES = {
    SubmitStatus.SENT: 201,
    SubmitStatus.DUPLICATE: 200,
    SubmitStatus.RECORDED: 202,
}


class InvalidOrder(ReceiverError):
    """The body is JSON but not an order submission; the message names the field."""

    status = 400
    code = "invalid_order"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field or 'body'}: {problem}")
        self.field = field


class UnknownConnection(ReceiverError):
    """The submission names no configured venue connection (or must name one)."""

    status = 400
    code = "unknown_connection"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def open_venue_client(
    connection: VenueConnection, observer: CallObserver
) -> AbstractContextManager[VenueClient]:
    """The default :data:`CLIENT_FACTORY`: a client of its own, with short retries, within
    the key's limit shared with every other process (:mod:`storage.venue_limits`)."""
    throttle = shared_throttle(current_receiver().engine, connection)
    return open_client(connection, retry=SUBMIT_NOW_RETRY, observer=observer, throttle=throttle)


@api.record_once
def _install_client_factory(state: BlueprintSetupState) -> None:
    # Set when the blueprint is registered, unless the app (or a test) already chose one.
    state.app.extensions.setdefault(CLIENT_FACTORY, open_venue_client)


@api.before_request
def require_token() -> None:
    """Only holders of a configured API token may create orders with the venue's key."""
    tokens = current_receiver().settings.api_tokens
    if not tokens:
        raise NotAuthorized("the API is closed: no OTACM_API_TOKENS are configured")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    offered = given.strip().encode()
    # Every token is compared, in constant time, so timing tells nothing about which.
    matches = [hmac.compare_digest(offered, t.get_secret_value().encode()) for t in tokens]
    if scheme.lower() != "bearer" or not any(matches):
        raise NotAuthorized("send 'Authorization: Bearer <token>' with a configured API token")


@api.post("/orders")
@spec.validate(
    json=SubmissionBody,
    resp=Answers(
        HTTP_201=SubmitAnswer,
        HTTP_200=SubmitAnswer,
        HTTP_202=SubmitAnswer,
        HTTP_400=ErrorBody,
        HTTP_401=ErrorBody,
        HTTP_413=ErrorBody,
        HTTP_415=ErrorBody,
        HTTP_422=ErrorBody,
        HTTP_503=ErrorBody,
    ),
    skip_validation=True,
    tags=["orders"],
)
def create_order() -> Response:
    """Submit one order to the venue.

    The sale is recorded, then sent at once: 201 when the venue took it, 200 when it was
    submitted before (nothing changes), 202 when it is recorded and will be retried, 422
    with the venue's code when the venue refused it.
    """
    receiver = current_receiver()
    # Nothing can be recorded until the database is ready: until then a 503.
    connection_ids = receiver.connection_ids()
    # Amounts are money: decoded exactly, never through float.
    body = read_json_body(request, receiver.settings.webhook_max_bytes, exact_numbers=True)
    try:
        submission = parse_submission(body)
        venue = choose_connection(receiver.settings.connections, submission.connection)
        check_connection(venue, submission.request)
    except SubmissionError as exc:
        if exc.code == "unknown_connection":
            raise UnknownConnection(exc.field, exc.problem) from None
        raise InvalidOrder(exc.field, exc.problem) from None

    factory = cast(VenueClientFactory, current_app.extensions[CLIENT_FACTORY])
    with factory(venue, receiver.metrics.venue_calls.observe) as client:
        outcome = submit_now(
            receiver.sessions,
            client,
            connection_ids[venue.name],
            submission.request,
            now=utcnow(),
            amount=submission.amount,
            currency=submission.currency,
            amount_includes_vat=submission.amount_includes_vat,
            connection=venue.name,
            lease_seconds=receiver.settings.outbox_lease_seconds,
        )
    logger.info(
        "POST /api/orders %s: %s (order %s, outbox %s)",
        outcome.reference,
        outcome.status,
        outcome.order_id or "-",
        outcome.outbox_id,
    )
    if outcome.status is SubmitStatus.FAILED:
        return error_response(
            422, outcome.code or "venue_rejected", outcome.message or "the venue refused the order"
        )
    response = jsonify(outcome.answer().model_dump(mode="json", by_alias=True))
    response.status_code = _STATUS_CODES[outcome.status]
    return response
